"""Pretrain the generator of the digits world with the rectified-flow (FLUX) loss.

    .venv/bin/python scripts/train_digits_reward.py      # first: the reward used for evaluation
    .venv/bin/python scripts/train_digits_generator.py

Trains the tiny ``FluxTransformer2DModel`` and its prompt encoder jointly on the train split
(``x_σ = (1 − σ)·x0 + σ·ε``, target ``v = ε − x0``), on purpose only far enough that the base
model leaves clear headroom for RL: a fraction ``--wrong-label-prob`` of training prompts name a
wrong digit, so the base model follows its prompt only part of the time. Writes
``src/branchgrpo/assets/digits/{tokenizer.json, transformer/, text_encoder/, generator.json}``
and reports the held-out mean reward with the SDE (η = 0.3) and ODE samplers. Fixed seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from branchgrpo.models.flux import FluxVelocity
from branchgrpo.worlds.digits.data import IMAGE_SIZE, load_digit_images
from branchgrpo.worlds.digits.evaluate import image_grid, sample_and_score
from branchgrpo.worlds.digits.generator import TRANSFORMER_CONFIG, build_transformer, images_to_latents
from branchgrpo.worlds.digits.prompts import PRETRAIN_TEMPLATES, make_prompt
from branchgrpo.worlds.digits.text import PromptEncoder, build_tokenizer, text_encoder_config
from branchgrpo.worlds.digits.world import ASSET_DIR, DigitsWorld, load_classifier


def training_prompts(labels: torch.Tensor, wrong_label_prob: float, dropout: float, generator) -> list[str]:
    """One prompt per image: a random phrasing of its digit, of a wrong digit (prob ``wrong_label_prob``)
    or the empty prompt (prob ``dropout``)."""
    n = labels.numel()
    wrong = torch.rand(n, generator=generator) < wrong_label_prob
    offset = torch.randint(1, 10, (n,), generator=generator)  # uniform over the 9 other digits
    digits = torch.where(wrong, (labels + offset) % 10, labels)
    templates = torch.randint(0, len(PRETRAIN_TEMPLATES), (n,), generator=generator)
    dropped = torch.rand(n, generator=generator) < dropout
    return [
        "" if dropped[i] else make_prompt(PRETRAIN_TEMPLATES[int(templates[i])], int(digits[i])) for i in range(n)
    ]


def sample_sigmas(n: int, generator: torch.Generator) -> torch.Tensor:
    """σ ~ logit-normal(0, 1) as SD3/FLUX training."""
    return torch.sigmoid(torch.randn(n, generator=generator))


def evaluate(world: DigitsWorld, samples_per_prompt: int, seed: int) -> dict:
    results = {}
    for name, eta in (("sde", 0.3), ("ode", 0.0)):
        scores = sample_and_score(world, world.heldout_prompts, samples_per_prompt, eta=eta, seed=seed)
        results[name] = {"mean_reward": round(scores.mean_reward, 4), "accuracy": round(scores.accuracy, 4)}
        results[name + "_scores"] = scores
    return results


def save_assets(out: Path, transformer, encoder: PromptEncoder, tokenizer, meta: dict) -> None:
    for name, module, config in (
        ("transformer", transformer, {k: v for k, v in transformer.config.items() if not k.startswith("_")}),
        ("text_encoder", encoder.text_model, encoder.text_model.config.to_diff_dict()),
    ):
        (out / name).mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(out / name / "model.safetensors"))
        config.pop("transformers_version", None)
        (out / name / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "generator.json").write_text(json.dumps(meta, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--wrong-label-prob", type=float, default=0.35)
    parser.add_argument("--prompt-dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: only at the end)")
    parser.add_argument("--eval-samples", type=int, default=8, help="samples per held-out prompt (20 prompts)")
    parser.add_argument("--out", type=Path, default=ASSET_DIR)
    parser.add_argument("--reward-dir", type=Path, default=ASSET_DIR, help="assets dir holding reward/")
    parser.add_argument("--grid", type=Path, default=None, help="write a PNG of SDE samples here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    images, labels = load_digit_images("train")
    latents = images_to_latents(images)
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    from transformers import CLIPTextModel

    text_model = CLIPTextModel(
        text_encoder_config(len(vocab), vocab["[EOS]"], vocab["[PAD]"], vocab["[BOS]"])
    )
    encoder = PromptEncoder(tokenizer, text_model)
    transformer = build_transformer(TRANSFORMER_CONFIG)
    policy = FluxVelocity(transformer, IMAGE_SIZE, IMAGE_SIZE, guidance_scale=None)
    world = DigitsWorld(policy, encoder, load_classifier(args.reward_dir).requires_grad_(False))
    print(
        f"transformer {sum(p.numel() for p in transformer.parameters()):,} params, "
        f"text encoder {sum(p.numel() for p in text_model.parameters()):,} params"
    )

    params = list(transformer.parameters()) + list(text_model.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps))),
    )
    history = []
    start = time.time()
    running = 0.0
    for step in range(1, args.steps + 1):
        rows = torch.randint(0, latents.shape[0], (args.batch_size,), generator=generator)
        x0 = latents[rows]
        noise = torch.randn(x0.shape, generator=generator)
        sigma = sample_sigmas(args.batch_size, generator)
        x_sigma = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        prompts = training_prompts(labels[rows], args.wrong_label_prob, args.prompt_dropout, generator)
        velocity = policy(x_sigma, sigma, encoder(prompts))
        loss = F.mse_loss(velocity, noise - x0)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        if step % 50 == 0:
            print(f"step {step:5d}  loss {running:.4f}  ({time.time() - start:.0f}s)", flush=True)
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            result = evaluate(world, args.eval_samples, seed=args.seed + 1)
            history.append({"step": step, "sde": result["sde"], "ode": result["ode"]})
            print(f"  eval step {step}: SDE {result['sde']}  ODE {result['ode']}", flush=True)
    train_seconds = time.time() - start

    result = evaluate(world, args.eval_samples, seed=args.seed + 1)
    print(f"final: held-out SDE {result['sde']}  ODE {result['ode']}")
    if args.grid is not None:
        from PIL import Image

        scores = result["sde_scores"]
        grid = image_grid(scores.images[: 10 * args.eval_samples], columns=args.eval_samples)
        Image.fromarray((grid * 255).round().byte().numpy()).resize((grid.shape[1] * 4, grid.shape[0] * 4), 0).save(
            args.grid
        )
    meta = {
        "train": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "grid", "reward_dir")},
        "train_seconds": round(train_seconds),
        "transformer_parameters": sum(p.numel() for p in transformer.parameters()),
        "text_encoder_parameters": sum(p.numel() for p in text_model.parameters()),
        "heldout_eval": {
            "prompts": "heldout_prompts (20)",
            "samples_per_prompt": args.eval_samples,
            "seed": args.seed + 1,
            "sampler": "rollout, TreeSpec(steps=20, shift=3.0, split_plan={}), leaf_x0",
            "sde_eta_0.3": result["sde"],
            "ode": result["ode"],
        },
        "history": history,
    }
    save_assets(args.out, transformer, encoder, tokenizer, meta)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
