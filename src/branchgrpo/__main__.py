import sys

from branchgrpo.cli import main

sys.exit(main())
