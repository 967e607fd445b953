import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

# Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP
# oversubscription makes them orders of magnitude slower. Override with BRANCHGRPO_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("BRANCHGRPO_TEST_THREADS", "1")))
