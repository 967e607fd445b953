"""How spread out are the rewards an advantage is normalised by, depth by depth, as a run trains?

``advantage.std_floor`` (docs/method.md §6) is an absolute floor on the per-group, per-depth std of
fused rewards. In a tree a node's fused reward averages the leaves below it, so the std at a depth
near the root is smaller than at the leaves, and a floor in reward units acts on shallow depths
first. This trains a preset on a world and, at chosen iterations, prints the median over groups of
that std at every depth with more than one node per group (the numbers ``depth_advantages``
divides by), read from the trainer's own scoring calls.

    OMP_NUM_THREADS=2 python benchmarks/depth_reward_spread.py branchgrpo-mix 0,10,20,40
    OMP_NUM_THREADS=2 python benchmarks/depth_reward_spread.py dancegrpo 0,4,8 [config overrides...]
    OMP_NUM_THREADS=2 python benchmarks/depth_reward_spread.py branchgrpo-mix 0,10 --config configs/shapes-branchgrpo.yaml

It also prints the share of (group, depth) cells whose std is below 1e-6, where the advantage is 0
(docs/method.md §6): a group whose samples all score the same teaches nothing.
"""
import sys

import torch


def group_stds(fused: list[torch.Tensor], group: list[torch.Tensor], num_groups: int) -> list[list[float]]:
    """Per depth, the unbiased std of each group's rewards there, for the groups with ≥ 2 nodes."""
    return [[reward[grp == g].double().std().item() for g in range(num_groups) if int((grp == g).sum()) > 1]
            for reward, grp in zip(fused, group)]


def median_group_std(fused: list[torch.Tensor], group: list[torch.Tensor], num_groups: int) -> list[float]:
    """Per depth, the median over groups with ≥ 2 nodes there of their rewards' unbiased std (NaN: none)."""
    return [float(torch.tensor(stds).median()) if stds else float("nan") for stds in group_stds(fused, group, num_groups)]


def degenerate_share(fused: list[torch.Tensor], group: list[torch.Tensor], num_groups: int) -> float:
    """Share of (group, depth) cells with ≥ 2 nodes whose rewards' std is below 1e-6 (zero advantage there)."""
    flat = [s < 1e-6 for stds in group_stds(fused, group, num_groups) for s in stds]
    return sum(flat) / len(flat) if flat else float("nan")


def main(argv: list[str]) -> None:
    from branchgrpo.train.config import load_train_config
    from branchgrpo.train.trainer import Trainer
    from branchgrpo.tree import scoring

    config_path = None
    if "--config" in argv:
        at = argv.index("--config")
        config_path, argv = argv[at + 1], argv[:at] + argv[at + 2:]
    preset = argv[0] if argv else "branchgrpo-mix"
    report_at = sorted(int(i) for i in (argv[1] if len(argv) > 1 else "0,10,20,40").split(","))
    config = load_train_config(config_path, preset, ["run.output_dir=runs/depth-reward-spread", "run.overwrite=true",
                                              "run.dump_tree_every=0", "run.progress=false", "run.tensorboard=false",
                                              "run.threads=2", "eval.every=0", *argv[2:]])
    seen: list[tuple[list[float], float]] = []
    original = scoring.depth_advantages

    def recording(fused, group, num_groups, std_floor=0.0):
        seen.append((median_group_std(fused, group, num_groups), degenerate_share(fused, group, num_groups)))
        return original(fused, group, num_groups, std_floor)

    scoring.depth_advantages = recording
    try:
        trainer = Trainer(config)
        print(f"{preset}: median over groups of the per-depth std of fused rewards (–: one node per group)")
        for iteration in range(report_at[-1] + 1):
            seen.clear()
            stats = trainer.step()
            if iteration in report_at:
                spread, degenerate = seen[-1]
                cells = " ".join("–" if s != s else f"{s:.3f}" for s in spread)
                print(f"iteration {iteration:3d}  mean leaf reward {float(stats.get('reward_mean', float('nan'))):.3f}"
                      f"  zero-advantage cells {degenerate:.0%}  std by depth: {cells}", flush=True)
    finally:
        scoring.depth_advantages = original


if __name__ == "__main__":
    main(sys.argv[1:])
