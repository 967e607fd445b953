"""A short BranchGRPO run on the digits world raises the held-out reward (fixed seeds).

Trained on two phrasings of a digit the base model draws badly ("2": base reward ≈ 0.1) and scored
on two phrasings it never trains on. Margin: see MIN_GAIN.
"""

import json

from branchgrpo.train.config import load_train_config
from branchgrpo.train.trainer import Trainer

# Measured 2026-11-25 (8 iterations, 1 thread): run.seed 0: 0.253 → 0.674 (+0.42); run.seed 1:
# 0.253 → 0.828 (+0.58). The threshold sits well below the smaller gain.
MIN_GAIN = 0.15


def run(tmp_path, seed):
    train = tmp_path / "train.txt"
    train.write_text("a handwritten 2\nthe digit 2\n")
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("a handwritten two\na drawing of the number 2\n")
    config = load_train_config(None, "branchgrpo", [
        f"run.output_dir={tmp_path / f'run{seed}'}", f"run.seed={seed}", "run.iterations=8", "eval.every=0",
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
