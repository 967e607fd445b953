import sys

from branchgrpo.report import main

sys.exit(main())
