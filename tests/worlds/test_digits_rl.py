"""A short BranchGRPO-Mix run on the digits world raises the held-out reward (fixed seeds).

Trained on two phrasings of a digit the base model draws badly ("2": base reward ≈ 0.1) and scored
on two phrasings it never trains on. Margin: see MIN_GAIN.
"""

import json

from branchgrpo.train.config import load_train_config
from branchgrpo.train.trainer import Trainer

# `branchgrpo-mix`, the fastest-learning preset per second (docs/benchmarks.md), keeps this test short.
# Measured 2026-11-28 (5 iterations, 2 threads): run.seed 0: 0.253 → 0.582 (+0.33); seed 1: → 0.820
# (+0.57); seed 2: → 0.845 (+0.59). The threshold sits well below the smallest gain. (The plain
# `branchgrpo` preset, 8 iterations, 1 thread, 2026-11-25: +0.42 and +0.58.)
MIN_GAIN = 0.15


def run(tmp_path, seed):
    train = tmp_path / "train.txt"
    train.write_text("a handwritten 2\nthe digit 2\n")
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("a handwritten two\na drawing of the number 2\n")
    config = load_train_config(None, "branchgrpo-mix", [
        f"run.output_dir={tmp_path / f'run{seed}'}", f"run.seed={seed}", "run.iterations=5", "eval.every=0",
        "eval.samples_per_prompt=8", f"data.train_prompts={train}", f"data.heldout_prompts={heldout}",
        "data.prompts_per_iteration=2", "run.progress=false", "run.tensorboard=false", "run.dump_tree_every=0",
        "run.checkpoint_every=0", "run.device=cpu", "run.sample_grid_every=0",
    ])
    return Trainer(config).run()


def test_short_digits_run_raises_heldout_reward(tmp_path):
    summary = run(tmp_path, seed=0)
    gain = summary.eval_reward_end - summary.eval_reward_start
    print(json.dumps({"start": summary.eval_reward_start, "end": summary.eval_reward_end}))
    assert gain >= MIN_GAIN, (summary.eval_reward_start, summary.eval_reward_end)
