"""Does a digits policy's forward get slower as it trains (on CPU, e.g. from subnormal floats)?

Trains a preset on the digits world; every 8 iterations times the policy's forward on a fixed batch
(16 rows, 4 noise levels, median of 5) with torch.set_flush_denormal off and on, interleaved, and
counts subnormal values in every module's output and in the weights.

    OMP_NUM_THREADS=2 python benchmarks/forward_drift.py branchgrpo-mix 48
"""
import statistics
import sys
import time

import torch
from branchgrpo.train.config import load_train_config
from branchgrpo.train.trainer import Trainer

torch.set_num_threads(2)
preset = sys.argv[1] if len(sys.argv) > 1 else "branchgrpo-mix"
iters = int(sys.argv[2]) if len(sys.argv) > 2 else 48
cfg = load_train_config(None, preset, ["run.output_dir=runs/forward-drift", "run.overwrite=true", "run.dump_tree_every=0", "run.progress=false",
                                       "run.tensorboard=false", "run.threads=2", "eval.every=0"])
tr = Trainer(cfg)
gen = tr.model
cond = gen.encode_prompts(gen.train_prompts[:4])
rows = 16
g = torch.Generator().manual_seed(0)
x = torch.randn(rows, *gen.latent_shape, generator=g)
idx = torch.arange(rows) % 4
c = {k: v[idx] for k, v in cond.items()}

def timed(flush):
    torch.set_flush_denormal(flush)
    with torch.no_grad():
        out = []
        for s in (0.9, 0.6, 0.3, 0.1):
            sig = torch.full((rows,), s)
            t = time.perf_counter(); gen.policy(x, sig, c); out.append(time.perf_counter() - t)
    torch.set_flush_denormal(False)
    return sum(out)

def subnormal_share():
    tiny = torch.finfo(torch.float32).tiny
    counts = [0, 0]
    def hook(_m, _i, o):
        if isinstance(o, torch.Tensor) and o.is_floating_point():
            a = o.detach().abs()
            counts[0] += int(((a > 0) & (a < tiny)).sum()); counts[1] += a.numel()
    hs = [m.register_forward_hook(hook) for m in gen.policy.modules()]
    with torch.no_grad():
        for s in (0.9, 0.6, 0.3, 0.1):
            gen.policy(x, torch.full((rows,), s), c)
    for h in hs: h.remove()
    wsub = sum(int(((p.abs() > 0) & (p.abs() < tiny)).sum()) for p in gen.policy.parameters())
    return counts[0] / max(counts[1], 1), wsub

print("iteration  ms_off  ms_on  off/on  subnormal_share_outputs  subnormal_weights", flush=True)
done = 0
for target in [0, 8, 16, 24, 32, 40, 48, 64, 80][: 1 + sum(1 for t in [8, 16, 24, 32, 40, 48, 64, 80] if t <= iters)]:
    while done < target:
        tr.step(); done += 1
    timed(False); timed(True)
    off, on = [], []
    for _ in range(5):
        off.append(timed(False)); on.append(timed(True))
    mo, mn = statistics.median(off) * 1e3, statistics.median(on) * 1e3
    share, wsub = subnormal_share()
    print(f"{done:9d}  {mo:6.1f}  {mn:6.1f}  {mo / mn:6.3f}  {share:.2e}  {wsub}", flush=True)
