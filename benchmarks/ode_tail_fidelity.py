"""What a compressed ODE tail (``tree.ode_tail``, docs/beyond-the-paper.md §7) does to the samples
a training rollout scores, before any training: the same trees (same noise, the base model) rolled
out with the full schedule and with each tail setting, leaves decoded and scored.

Per setting it prints the model calls per leaf, the mean reward, the RMS pixel difference from the
full-schedule leaves, and how far the group-relative signal moves: the correlation between the
leaves' within-group z-scores with and without the tail (1 = the advantages are unchanged), and the
share of groups whose best leaf stays the best.

    OMP_NUM_THREADS=2 python benchmarks/ode_tail_fidelity.py mixgrpo [--config FILE] [--prompts 16] [--out F.md]
    OMP_NUM_THREADS=2 python benchmarks/ode_tail_fidelity.py branchgrpo-mix --config configs/shapes-branchgrpo.yaml
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import torch


def group_z(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Leaf rewards as z-scores within their group, with the population std. docs/method.md §6 uses the
    unbiased one; every group here has the same size, so the two differ by one constant factor and the
    correlation and best-leaf columns are the same either way."""
    out = torch.empty_like(rewards)
    for g in group.unique():
        rows = group == g
        r = rewards[rows]
        out[rows] = (r - r.mean()) / r.std(unbiased=False).clamp_min(1e-12)
    return out


def main(argv: list[str]) -> None:
    from branchgrpo.train.components import score_rewards
    from branchgrpo.train.config import load_train_config
    from branchgrpo.train.trainer import Trainer
    from branchgrpo.tree.rollout import rollout
    from branchgrpo.tree.spec import OdeTail

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset")
    parser.add_argument("--config")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--iteration", type=int, default=0, help="the window's position (training iteration)")
    parser.add_argument("--out")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    config = load_train_config(args.config, args.preset, [
        "run.output_dir=runs/ode-tail-fidelity", "run.overwrite=true", "run.dump_tree_every=0", "run.progress=false",
        "run.tensorboard=false", "eval.every=0", *args.overrides])
    trainer = Trainer(config)
    prompts = trainer.model.train_prompts[: args.prompts]
    conditioning = trainer.model.encode_prompts(prompts)
    base = dataclasses.replace(config.method.tree, ode_tail=None)
    settings = [("full schedule", None), ("keep 0.4, order 2", OdeTail(0.4, 2)), ("keep 0.4, order 1", OdeTail(0.4, 1)),
                ("keep 0.2, order 2", OdeTail(0.2, 2)), ("keep 0.6, order 2", OdeTail(0.6, 2))]
    rows, reference = [], None
    for label, tail in settings:
        spec = dataclasses.replace(base, ode_tail=tail)
        with torch.no_grad():
            tree = rollout(trainer.model.policy, conditioning, spec, len(prompts), trainer.model.latent_shape,
                           generator=[torch.Generator().manual_seed(1000 + g) for g in range(len(prompts))],
                           iteration=args.iteration, micro_batch=config.method.engine.rollout_micro_batch)
            images = trainer.model.decode(tree.leaf_x0).float()
        group = tree.group[-1]
        leaf_prompts = [prompts[int(g)] for g in group]
        rewards = score_rewards(trainer.reward, images, leaf_prompts, torch.zeros(len(group), dtype=torch.long),
                                config.reward.batch_size, absolute=True).total.double()
        z = group_z(rewards, group)
        if reference is None:
            reference = (images, rewards, z)
        ref_images, ref_rewards, ref_z = reference
        best_same = sum(int(torch.argmax(rewards[group == g]) == torch.argmax(ref_rewards[group == g]))
                        for g in group.unique()) / len(group.unique())
        rows.append({
            "setting": label, "calls_per_leaf": tree.rollout_calls / len(group), "tail": spec.ode_tail_at(args.iteration),
            "reward": float(rewards.mean()), "rms_pixels": float((images - ref_images).pow(2).mean().sqrt()),
            "mean_abs_reward_change": float((rewards - ref_rewards).abs().mean()),
            "z_correlation": float(torch.corrcoef(torch.stack([z, ref_z]))[0, 1]), "best_leaf_kept": best_same})
    lines = [f"# ODE tail fidelity: `{args.preset}`{' on ' + args.config if args.config else ''}, iteration "
             f"{args.iteration}, {len(prompts)} training prompts, the base model", "",
             f"- command: `python benchmarks/ode_tail_fidelity.py {' '.join(argv)}`; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads", "",
             "| setting | tail (first step, calls) | model calls per leaf | mean reward | RMS pixel change | mean abs reward change | "
             "within-group z correlation | best leaf kept |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['tail'] or '–'} | {r['calls_per_leaf']:.2f} | {r['reward']:.4f} | "
                     f"{r['rms_pixels']:.4f} | {r['mean_abs_reward_change']:.4f} | {r['z_correlation']:.3f} | "
                     f"{r['best_leaf_kept']:.0%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main(sys.argv[1:])
