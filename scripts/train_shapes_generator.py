"""Pretrain the generator of the shapes world with the rectified-flow (FLUX) loss.

    .venv/bin/python scripts/train_shapes_generator.py --grid docs/img/shapes-base.png

Trains the tiny ``FluxTransformer2DModel`` and its prompt encoder jointly on procedurally rendered
scenes of the train prompts only (``--seeds-per-prompt`` layouts each; held-out prompts are never
drawn), ``x_σ = (1 − σ)·x0 + σ·ε``, target ``v = ε − x0``. On purpose only far enough that the base
model leaves headroom for RL: a fraction ``--wrong-label-prob`` of captions name another train
prompt. Writes ``src/branchgrpo/assets/shapes/{tokenizer.json, transformer/, text_encoder/,
generator.json}``, then reports the held-out mean verifier reward (SDE η = 0.3 and ODE). Fixed seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_digits_generator import sample_sigmas, save_assets  # noqa: E402

from branchgrpo.models.flux import FluxVelocity  # noqa: E402
from branchgrpo.worlds.shapes.evaluate import image_grid, sample_and_score  # noqa: E402
from branchgrpo.worlds.shapes.generator import LATENT_SIZE, TRANSFORMER_CONFIG, build_transformer, images_to_latents  # noqa: E402
from branchgrpo.worlds.shapes.prompts import parse_prompt, split_prompts  # noqa: E402
from branchgrpo.worlds.shapes.scenes import render  # noqa: E402
from branchgrpo.worlds.shapes.text import PromptEncoder, build_tokenizer, text_encoder_config  # noqa: E402
from branchgrpo.worlds.shapes.world import ASSET_DIR, ShapesWorld  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--max-seconds", type=float, default=0.0,
                        help="wall-clock budget: the cosine schedule runs on max(step/steps, elapsed/budget) and "
                             "training stops when either reaches 1 (0: steps only)")
    parser.add_argument("--seeds-per-prompt", type=int, default=4)
    parser.add_argument("--wrong-label-prob", type=float, default=0.15)
    parser.add_argument("--prompt-dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-samples", type=int, default=8, help="samples per held-out prompt (24 prompts)")
    parser.add_argument("--out", type=Path, default=ASSET_DIR)
    parser.add_argument("--grid", type=Path, default=None, help="write a PNG of SDE held-out samples here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    train_prompts, heldout_prompts = split_prompts()
    start = time.time()
    prompts = [p for p in train_prompts for _ in range(args.seeds_per_prompt)]
    images = torch.stack([render(parse_prompt(p), seed) for seed, p in enumerate(prompts)]) * 2 - 1
    latents = images_to_latents(images)
    print(f"rendered {len(prompts)} scenes in {time.time() - start:.0f}s", flush=True)
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    from transformers import CLIPTextModel

    text_model = CLIPTextModel(text_encoder_config(len(vocab), vocab["[EOS]"], vocab["[PAD]"], vocab["[BOS]"]))
    encoder = PromptEncoder(tokenizer, text_model)
    transformer = build_transformer(TRANSFORMER_CONFIG)
    policy = FluxVelocity(transformer, LATENT_SIZE, LATENT_SIZE, guidance_scale=None)
    print(f"transformer {sum(p.numel() for p in transformer.parameters()):,} params", flush=True)

    params = list(transformer.parameters()) + list(text_model.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    start = time.time()

    def progress(s: int) -> float:
        budget = (time.time() - start) / args.max_seconds if args.max_seconds > 0 else 0.0
        return min(1.0, max(s / args.steps, budget))

    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress(s)))),
    )
    rng = random.Random(args.seed)
    running = 0.0
    steps_done = 0
    for step in range(1, args.steps + 1):
        if progress(step - 1) >= 1.0:
            break
        steps_done = step
        rows = torch.randint(0, latents.shape[0], (args.batch_size,), generator=generator)
        x0 = latents[rows]
        noise = torch.randn(x0.shape, generator=generator)
        sigma = sample_sigmas(args.batch_size, generator)
        x_sigma = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        captions = []
        for row in rows.tolist():
            u = rng.random()
            captions.append("" if u < args.prompt_dropout else
                            rng.choice(train_prompts) if u < args.prompt_dropout + args.wrong_label_prob else prompts[row])
        velocity = policy(x_sigma, sigma, encoder(captions))
        loss = F.mse_loss(velocity, noise - x0)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        if step % 25 == 0:
            print(f"step {step:5d}  loss {running:.4f}  ({time.time() - start:.0f}s)", flush=True)
    train_seconds = time.time() - start
    print(f"trained {steps_done} steps", flush=True)
    meta = {
        "steps_done": steps_done,
        "train": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "grid")},
        "train_seconds": round(train_seconds),
        "transformer_parameters": sum(p.numel() for p in transformer.parameters()),
        "text_encoder_parameters": sum(p.numel() for p in text_model.parameters()),
    }
    save_assets(args.out, transformer, encoder, tokenizer, meta)
    print(f"wrote {args.out} after {train_seconds:.0f}s of training", flush=True)

    world = ShapesWorld(policy.eval(), encoder.eval())
    results = {}
    for name, eta in (("sde_eta_0.3", 0.3), ("ode", 0.0)):
        out_images, _, rewards = sample_and_score(world, heldout_prompts, args.eval_samples, eta=eta, seed=args.seed + 1)
        results[name] = {"mean_reward": round(float(rewards.mean()), 4)}
        if name.startswith("sde") and args.grid is not None:
            from PIL import Image

            grid = image_grid(out_images, columns=args.eval_samples)
            array = (grid.permute(1, 2, 0) * 255).round().byte().numpy()
            args.grid.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).resize((array.shape[1] * 4, array.shape[0] * 4), 0).save(args.grid)
    print(f"final: held-out {results}", flush=True)
    meta["heldout_eval"] = {
        "prompts": f"heldout_prompts ({len(heldout_prompts)})", "samples_per_prompt": args.eval_samples,
        "seed": args.seed + 1, "sampler": "rollout, TreeSpec(steps=20, shift=3.0, split_plan={}), leaf_x0", **results,
    }
    (args.out / "generator.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
