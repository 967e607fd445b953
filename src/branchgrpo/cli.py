"""Command line: thin parsing and validation around the library; errors print without a traceback."""

from __future__ import annotations

import argparse
import json
import sys

from branchgrpo.config import ConfigError
from branchgrpo.tree.nfe import Plan, plan
from branchgrpo.tree.presets import list_presets, method_config


class CliError(Exception):
    """A user mistake caught by the CLI; printed as one line."""


def _split_overrides(items: list[str]) -> tuple[list[str], int]:
    """Pull ``iteration=N`` out of the overrides (it is not a config field)."""
    rest, iteration = [], 0
    for item in items:
        key, _, value = item.partition("=")
        if key.strip() == "iteration":
            try:
                iteration = int(value)
            except ValueError:
                raise ConfigError("iteration", f"expected a non-negative integer, got {value!r}") from None
            if iteration < 0:
                raise ConfigError("iteration", f"expected a non-negative integer, got {iteration}")
        else:
            rest.append(item)
    return rest, iteration


def format_plan(result: Plan) -> str:
    """Human-readable tree shape and NFE accounting."""
    cfg = result.config
    tree = cfg.tree
    c = result.counts
    per_leaf = c.per_leaf()
    splits = ", ".join(f"step {s}: K={k}" for s, k in tree.split_plan.items()) or "none"
    sde = [i for i, s in enumerate(result.sde_steps) if s]
    lines = [
        f"preset {cfg.name}  (iteration {result.iteration})",
        f"  steps T={tree.steps}  shift={tree.shift}  eta={tree.eta}  roots/prompt={tree.roots_per_prompt}",
        f"  splits: {splits}  noise={tree.split_noise} s={tree.split_noise_scale}",
        f"  SDE steps: {sde if len(sde) < tree.steps else 'all'}",
        f"  leaves per prompt: {c.leaves}",
        "",
        "  depth  nodes  trained edges into depth",
    ]
    for d, (n, t) in enumerate(zip(result.nodes_per_depth, result.trained_per_depth)):
        lines.append(f"  {d:>5}  {n:>5}  {t if d else '-':>5}")
    lines += [
        "",
        "  per prompt            total    per leaf",
        f"  rollout calls     {c.rollout_calls:>9}  {per_leaf['rollout_calls']:>10.4f}",
        f"  nodes (incl root) {c.nodes:>9}  {per_leaf['nodes']:>10.4f}",
        f"  edges             {c.edges:>9}  {per_leaf['edges']:>10.4f}",
        f"  trained edges     {c.trained_edges:>9}  {per_leaf['trained_edges']:>10.4f}",
        f"  training forwards {c.training_forwards:>9}  {per_leaf['training_forwards']:>10.4f}",
    ]
    if result.skipped:
        lines.append("  edges skipped by rule: " + ", ".join(f"{k}={v}" for k, v in result.skipped.items()))
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    overrides, iteration = _split_overrides(args.overrides)
    config = method_config(args.preset, overrides)
    result = plan(config, iteration=iteration, seed=args.seed)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(format_plan(result))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    for name in list_presets():
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="branchgrpo", description="Tree-structured GRPO for flow-matching generators.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="show a method's tree and NFE cost without loading a model")
    p.add_argument("--preset", default="branchgrpo", help="method preset (see `branchgrpo presets`)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seed", type=int, default=0, help="seed of the random step subset (timestep_fraction)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. tree.steps=16 iteration=30")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("presets", help="list the method presets")
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, CliError) as err:
        print(f"branchgrpo: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
