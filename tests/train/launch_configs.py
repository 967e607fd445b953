"""Train several configs one after another in one torchrun job, each through the real entry point.

    torchrun --standalone --nproc-per-node 2 tests/train/launch_configs.py JOBS.json

``JOBS.json`` is a list of ``{"config": FILE, "overrides": ["key=value", ...]}``; every rank runs
``branchgrpo train --config FILE key=value ...`` (:func:`branchgrpo.cli.main`) for each job in order,
so the processes start (and import torch, diffusers, transformers) once for all of them.

The jobs share one gloo process group, made here from torchrun's environment as the trainer makes
it (``DistributedContext.initialise`` joins an existing group) and kept open between jobs: a group
destroyed and made again in one process hangs under ``torchrun --standalone`` (torch 2.14; the
agent's store still holds the first group's keys). Its timeout is short, so a rank left waiting in
a collective fails instead of waiting 30 minutes. The first job that does not exit 0 stops the
launch with its exit status (torchrun then ends the other rank).
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta


def main(jobs_file: str) -> int:
    import torch
    import torch.distributed as dist

    from branchgrpo.cli import main as branchgrpo
    from branchgrpo.train.distributed import DistributedContext

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    dist.init_process_group("gloo", timeout=timedelta(minutes=5))
    DistributedContext.close = lambda self: None  # the group outlives each job
    for job in json.loads(open(jobs_file).read()):
        start = time.perf_counter()
        code = branchgrpo(["train", "--config", job["config"], *job["overrides"]])
        if rank == 0:
            print(f"launch_configs: {os.path.basename(job['config'])}: exit {code} after "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
        if code != 0:
            return code
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
