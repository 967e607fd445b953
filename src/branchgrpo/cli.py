"""Command line: thin parsing and validation around the library; errors print without a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

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


def _tail_line(tree, iteration: int) -> list[str]:
    tail = tree.ode_tail_at(iteration)
    if tail is None:
        return []
    first, calls = tail
    return [f"  ODE tail: steps {first}..{tree.steps - 1} ({tree.steps - first}) in {calls} model calls per chain, "
            f"order {tree.ode_tail.order}"]


def format_plan(result: Plan) -> str:
    """Human-readable tree shape and NFE accounting."""
    cfg = result.config
    tree = cfg.tree
    c = result.counts
    per_leaf = c.per_leaf()
    splits = ", ".join(f"step {s}: K={k}" for s, k in tree.split_plan_at(result.iteration).items()) or "none"
    sde = [i for i, s in enumerate(result.sde_steps) if s]
    lines = [
        f"preset {cfg.name}  (iteration {result.iteration})",
        f"  steps T={tree.steps}  shift={tree.shift}  eta={tree.eta}  roots/prompt={tree.roots_per_prompt}",
        f"  splits: {splits}  noise={tree.split_noise} s={tree.split_noise_scale}",
        f"  SDE steps: {sde if len(sde) < tree.steps else 'all'}",
        *_tail_line(tree, result.iteration),
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
    if args.config is None:
        if args.processes != 1 or args.gpu_memory is not None:
            raise CliError("--processes and --gpu-memory size a training job: pass its --config FILE")
        config = method_config(args.preset or "branchgrpo", overrides)
        result = plan(config, iteration=iteration, seed=args.seed)
        print(json.dumps(result.to_json()) if args.json else format_plan(result))
        return 0
    # a job: train's config and keys (method.tree.steps=16, model.lora.rank=32), plus its resources
    from branchgrpo.resources import estimate_job, format_estimate, parse_memory, transformer_config
    from branchgrpo.train.config import load_train_config

    job = load_train_config(args.config, args.preset, overrides)
    result = plan(job.method, iteration=iteration, seed=args.seed)
    try:
        gpu_memory = None if args.gpu_memory is None else parse_memory(args.gpu_memory)
        arch_config, source = transformer_config(job.model.family, job.model.path, job.model.options)
        estimate = estimate_job(job, arch_config, args.processes, gpu_memory, source, iteration)
    except ValueError as err:
        raise CliError(str(err)) from None
    if args.json:
        print(json.dumps({**result.to_json(), "resources": estimate.to_json()}))
    else:
        print(format_plan(result) + "\n\n" + format_estimate(estimate))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from branchgrpo.families import available_families
    from branchgrpo.train.config import family_defaults
    from branchgrpo.tree.presets import preset_description

    names = list_presets()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {preset_description(name)}")
    print("\nmodel families add their recommended method settings on top of any preset (a config file or "
          "override wins):")
    for family in available_families():
        defaults = family_defaults(family)
        print(f"  {family}: " + (", ".join(f"{k}={v}" for k, v in defaults.items()) or "none"))
    return 0


def cmd_families(args: argparse.Namespace) -> int:
    from branchgrpo.families import available_families, get_family

    families = available_families()
    width = max(len(n) for n in families)
    for name, description in families.items():
        print(f"{name:<{width}}  {get_family(name).modality:<5}  {description}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from branchgrpo.config_reference import reference_markdown, reference_text

    print(reference_markdown() if args.markdown else reference_text(args.family), end="" if args.markdown else "\n")
    return 0


def _train_config(args: argparse.Namespace):
    from branchgrpo.train.config import load_train_config

    config_file = args.config
    run_dir = getattr(args, "run", None)
    if run_dir is not None:
        resolved = Path(run_dir) / "config.yaml"
        if not resolved.is_file():
            raise CliError(f"{run_dir} is not a run directory (no config.yaml); pass the folder `branchgrpo train` wrote")
        config_file = config_file or resolved
    return load_train_config(config_file, getattr(args, "preset", None), args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from branchgrpo.train.components import validate_job

    config = _train_config(args)
    validate_job(config)  # every missing file, before the trainer's imports (seconds) and any loading
    from branchgrpo.train.trainer import StartupInterrupted, Trainer

    try:
        trainer = Trainer(config)
    except StartupInterrupted as stop:  # SIGTERM/SIGUSR1 while loading: nothing was written
        print(stop)
        return 0
    try:
        summary = trainer.run()
    finally:
        trainer.dist.close()
    if trainer.dist.is_main:
        if summary.stopped_by_signal:
            print(f"stopped by {summary.stopped_by_signal} after {summary.iterations} iterations; "
                  f"checkpoint in {summary.output_dir}/checkpoints (resume with run.resume=auto)")
        else:
            print(
                f"done: {summary.iterations} iterations in {summary.seconds:.0f} s; held-out mean reward "
                f"{summary.eval_reward_start:.4f} -> {summary.eval_reward_end:.4f}; results in {summary.output_dir}"
            )
    return 0


def _load_run_policy(args: argparse.Namespace, with_reward: bool = True):
    """The run's (or config's) policy with the chosen weights, and its reward; all checks first."""
    from branchgrpo.train.components import apply_speed_settings, build_policy, build_reward, resolve_device, validate_job
    from branchgrpo.train.weights import load_weights

    config = _train_config(args)
    validate_job(config, custom_reward=not with_reward, job=args.command)  # every missing file, before loading
    weights = args.weights
    if weights is None and args.run is not None:
        name = "ema.safetensors" if getattr(args, "ema", False) else "model.safetensors"
        weights = Path(args.run) / "weights" / name
        if getattr(args, "ema", False) and not weights.is_file():
            raise CliError(f"{weights} does not exist: the run kept no EMA (train with run.ema_decay=0.995)")
    if weights is not None and not Path(weights).is_file():
        raise CliError(f"weights file {weights} does not exist")
    device = resolve_device(config.run.device)
    bundle = build_policy(config, device)
    if weights is not None:
        load_weights(bundle.trainable, weights)
    apply_speed_settings(config.model, bundle)
    reward = build_reward(config, bundle, device) if with_reward else None
    return config, device, bundle, reward


def _edit_rows(args: argparse.Namespace) -> list[str]:
    """``sample --image``: each ``--prompt`` as an edit row of that source image (editing families only),
    checked before any model loads."""
    from branchgrpo.families import available_families, get_family

    family = get_family(_train_config(args).model.family)
    if not getattr(family, "editing", False):
        editing = [name for name in available_families() if getattr(get_family(name), "editing", False)]
        raise CliError(f"--image: the {family.name} family does not edit images; --image is for the editing "
                       f"families ({', '.join(editing)})")
    if not args.prompt:
        raise CliError("--image needs --prompt INSTRUCTION (repeatable): the edit to make")
    path = Path(args.image).expanduser()
    if not path.is_file():
        raise CliError(f"--image: {path} {'is a folder' if path.is_dir() else 'does not exist'}; expected an image file")
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds for a file it cannot read
        raise CliError(f"--image: cannot read {path} as an image ({type(err).__name__})") from None
    return [json.dumps({"prompt": text, "image": str(path.resolve())}) for text in args.prompt]


def cmd_sample(args: argparse.Namespace) -> int:
    from branchgrpo.train.evaluation import sample, save_image_grid, save_video_grid

    fps, frames = args.fps, args.frames
    if not fps > 0 or frames < 1:
        raise CliError("--fps must be > 0 and --frames >= 1")
    edits = _edit_rows(args) if args.image is not None else None
    config, device, bundle, _ = _load_run_policy(args, with_reward=False)
    prompts = edits or args.prompt or bundle.heldout_prompts
    if not prompts:
        raise CliError("no prompts: pass --prompt TEXT (repeatable)")
    eta = config.method.tree.eta if args.eta is None else args.eta
    images, _ = sample(bundle, prompts, args.num, config.method.tree, eta, args.seed,
                       config.method.engine.rollout_micro_batch, device)
    if images.ndim == 5:  # videos [N, F, C, H, W] (wan): a PNG strip of frames and an animated GIF
        png, gif = save_video_grid(images, Path(args.out), columns=args.num, fps=fps, frames=frames,
                                   max_cell=args.max_size or None)
        print(f"wrote {images.shape[0]} videos of {images.shape[1]} frames ({len(prompts)} prompts x {args.num}): "
              f"frames to {png}, animation ({fps:g} fps) to {gif}")
        return 0
    path = save_image_grid(images, Path(args.out), columns=args.num)
    print(f"wrote {images.shape[0]} images ({len(prompts)} prompts x {args.num}) to {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from branchgrpo.train.evaluation import evaluate

    config, device, bundle, reward = _load_run_policy(args)
    if args.samples is not None:
        config.eval.samples_per_prompt = args.samples
    result = evaluate(bundle, reward, bundle.heldout_prompts, config, device)
    rows = result.per_prompt()
    means = result.means()
    columns = list(means)
    width = max(len(p) for p in list(rows) + ["prompt"])
    print(f"{'prompt':<{width}}  " + "  ".join(f"{c:>10}" for c in columns))
    for prompt, values in rows.items():
        print(f"{prompt:<{width}}  " + "  ".join(f"{values[c]:>10.4f}" for c in columns))
    print(f"{'mean':<{width}}  " + "  ".join(f"{means[c]:>10.4f}" for c in columns))
    if args.json:
        Path(args.json).write_text(json.dumps({"mean": means, "per_prompt": rows}, indent=2) + "\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from branchgrpo.families import get_family

    config, _, bundle, _ = _load_run_policy(args, with_reward=False)
    out = Path(args.out)
    if config.model.lora is not None:
        print(get_family(config.model.family).export_lora(bundle, config, out))
        return 0
    print(get_family(config.model.family).export(bundle, config, out, args.link))
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from branchgrpo.families import get_family
    from branchgrpo.train.components import read_prompt_file, resolve_device, validate_job, weights_dtype

    config = _train_config(args)
    family = get_family(config.model.family)
    if not family.prompt_cache:
        raise ConfigError("model.family", f"the {family.name} family encodes its prompts itself and has no prompt "
                          "cache; preprocess is for families with text encoders (e.g. flux, sd3, wan)")
    if config.model.prompt_cache_dir is None:
        raise CliError("set model.prompt_cache_dir=FOLDER: where the prompt embeddings are stored")
    validate_job(config, custom_reward=True, job="preprocess")  # the text encoders' files and the prompt files
    prompts = []
    for path, field in ((config.data.train_prompts, "data.train_prompts"), (config.data.heldout_prompts, "data.heldout_prompts")):
        if path is not None:
            prompts += read_prompt_file(path, field)
    if not prompts:
        raise CliError("no prompt files: set data.train_prompts (and data.heldout_prompts)")
    device = resolve_device(config.run.device)
    dtype = weights_dtype(config, device)
    encoder = family.prompt_encoder(config, device, dtype)
    # the adapter's own preprocess_prompts also caches the negative prompt (classifier-free guidance)
    report = encoder.preprocess_prompts(prompts, config.model.prompt_cache_dir)
    print(report)
    print(f"{family.name} prompt embeddings ({str(dtype).replace('torch.', '')}, as training on {device} computes "
          f"them) are in {report.cache_directory}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from branchgrpo.report import run_from_args

    return int(run_from_args(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="branchgrpo", description="Tree-structured GRPO for flow-matching generators.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="show a method's tree and NFE cost (with --config: a job's memory and FLOPs "
                                     "per process) without loading a model")
    p.add_argument("--preset", help="method preset (see `branchgrpo presets`; default: the config's, else branchgrpo)")
    p.add_argument("--config", help="a training config (as for train): add its resources per process")
    p.add_argument("--processes", type=int, default=1, help="with --config: processes (GPUs) of the job (default 1)")
    p.add_argument("--gpu-memory", help="with --config: memory of one GPU, e.g. 80GB or 80GiB; says whether it fits")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seed", type=int, default=0, help="seed of the random step subset (timestep_fraction)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. tree.steps=16 iteration=30 (with --config: method.tree.steps=16)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("train", help="train a generator with a GRPO method (default: BranchGRPO on the digits world)")
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--preset", help="method preset (see `branchgrpo presets`); overrides the config's")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. run.iterations=20 method.tree.eta=0.5")
    p.set_defaults(func=cmd_train)

    for name, helptext, func in (
        ("sample", "generate images (or videos) from a run's weights", cmd_sample),
        ("eval", "score weights on the held-out prompts", cmd_eval),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--run", help="run directory written by `branchgrpo train`")
        p.add_argument("--weights", help="weights file (default: RUN/weights/model.safetensors; none: the base model)")
        p.add_argument("--config", help="YAML config file (default: RUN/config.yaml)")
        p.add_argument("overrides", nargs="*", metavar="key=value")
        p.set_defaults(func=func)
        p.add_argument("--ema", action="store_true", help="use the run's EMA weights (run.ema_decay > 0)")
        if name == "sample":
            p.add_argument("--prompt", action="append", help="prompt (repeatable; default: the held-out prompts)")
            p.add_argument("--image", help="editing families: the source image; each --prompt is an instruction")
            p.add_argument("--num", type=int, default=4, help="images per prompt")
            p.add_argument("--eta", type=float, help="sampler eta (default: the method's; 0 = ODE)")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--out", default="samples.png",
                           help="output PNG grid (videos: a PNG of frames, one row per video, and a GIF beside it)")
            p.add_argument("--fps", type=float, default=16.0, help="videos: GIF frame rate (default 16, Wan2.1's)")
            p.add_argument("--frames", type=int, default=4, help="videos: evenly spaced frames per video in the PNG")
            p.add_argument("--max-size", type=int, default=0,
                           help="videos: shrink frames to at most this many pixels on the long side (default: full)")
        else:
            p.add_argument("--samples", type=int, help="samples per prompt (default: eval.samples_per_prompt)")
            p.add_argument("--json", help="also write the scores to this JSON file")

    p = sub.add_parser("export", help="write a run's result for diffusers: a pipeline folder, or a LoRA file")
    p.add_argument("run", help="run directory written by `branchgrpo train`")
    p.add_argument("out", help="output folder (full fine-tune) or .safetensors file (LoRA)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument("--link", choices=["symlink", "copy", "hardlink"], default="symlink",
                   help="how the base model's other components get into the folder")
    p.add_argument("--weights", help="weights file (default: RUN/weights/model.safetensors)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_export, config=None)

    p = sub.add_parser("preprocess", help="fill the prompt-embedding cache (flux, sd3, wan) ahead of training")
    p.add_argument("--config", help="YAML config file (needs model.path, model.prompt_cache_dir, data.*_prompts)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_preprocess, run=None)

    p = sub.add_parser("bench", help="train the Table-1 methods side by side and write bench.md/csv + plots")
    from branchgrpo import bench_cli

    bench_cli.add_arguments(p)
    p.set_defaults(func=bench_cli.run_from_args)

    p = sub.add_parser("report", help="write a self-contained HTML report of a run")
    from branchgrpo.report import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("presets", help="list the method presets (and the model families' recommended settings)")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("families", help="list the model families (model.family)")
    p.set_defaults(func=cmd_families)

    p = sub.add_parser("config", help="every config key with its type, default and help")
    p.add_argument("--family", help="show this model family's model.options keys instead")
    p.add_argument("--markdown", action="store_true", help="the whole reference as markdown (docs/config.md)")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, CliError, FileNotFoundError) as err:
        if int(os.environ.get("RANK", "0") or 0) == 0:  # under torchrun every rank fails alike: say it once
            for line in str(err).splitlines() or [type(err).__name__]:
                print(f"branchgrpo: error: {line}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:  # an optional dependency a command needs
        extra = {"diffusers": "models", "transformers": "models", "peft": "models", "open_clip": "rewards",
                 "matplotlib": "bench", "wandb": None, "rapidocr_onnxruntime": "ocr"}.get((err.name or "").split(".")[0])
        hint = (f"pip install 'branchgrpo[{extra}]'" if extra else f"pip install {err.name}") if err.name else ""
        print(f"branchgrpo: error: this command needs the package {err.name!r}, which is not installed; {hint}",
              file=sys.stderr)
        return 2
    except BrokenPipeError:  # `branchgrpo plan | head`: the reader left; nothing more to say
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the interpreter's final flush stays quiet
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        print("branchgrpo: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a failure at run time: one line here, the details for a bug report
        from branchgrpo.rewards.base import RewardError
        from branchgrpo.train.weights import NonFiniteWeightsError

        if isinstance(err, (RewardError, NonFiniteWeightsError)):
            print(f"branchgrpo: error: {err}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
