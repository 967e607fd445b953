"""Per-step fixed costs of the policy update on the shapes and digits generators: AdamW per-tensor vs
foreach vs fused, the finite-gradient check and clipping (median of 30, milliseconds). Run from the
repository root on a quiet machine: OMP_NUM_THREADS=2 python benchmarks/optimizer_step.py"""
import statistics
import time

import torch

from branchgrpo.train.config import load_train_config
from branchgrpo.train.components import build_policy
from branchgrpo.update import GradientSync, _clip_gradients
torch.set_num_threads(2)
for cfg_file in ("configs/shapes-branchgrpo.yaml", None):
    config = load_train_config(cfg_file, "branchgrpo-mix", ["run.output_dir=/tmp/ob", "run.device=cpu"])
    bundle = build_policy(config, torch.device("cpu"))
    params = [p for p in bundle.trainable.parameters() if p.requires_grad]
    print(cfg_file or "digits", "params", len(params), sum(p.numel() for p in params))
    def timed(fn, n=30):
        ts = []
        for _ in range(n):
            t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e3
    for kind in ("default", "foreach", "fused"):
        kw = {} if kind == "default" else {kind: True}
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-4, **kw)
        def step():
            for p in params: p.grad = torch.randn_like(p) * 1e-3
            opt.step()
        def grads():
            for p in params: p.grad = torch.randn_like(p) * 1e-3
        g = timed(grads)
        print(f"  {kind}: step {timed(step) - g:.2f} ms")
    sync = GradientSync()
    for p in params: p.grad = torch.randn_like(p)
    print(f"  finite check {timed(lambda: sync.finite_gradients(params)):.2f} ms, clip {timed(lambda: _clip_gradients(params, 1.0)):.2f} ms")
    print(f"  zero_grad {timed(lambda: [setattr(p, 'grad', None) for p in params]):.3f} ms")
