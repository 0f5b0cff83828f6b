"""Stage 2-2 training step: packed native resolution + packed LLM rows vs LLaVA-style padding.

One synthetic micro-batch of ``--samples`` samples, each one image of a random native size and a
random conversation (random token ids, one image placeholder, labels on the answer), goes through a
full Stage 2-2 training step of :class:`viq.train.model.TrainModel`: encoder -> FSQ head -> dequant
-> projector -> LLM (text loss), plus self-distillation against a frozen teacher snapshot and
VAE-latent reconstruction against a frozen (random) VAE, all parts trainable, AdamW, gradient
clipping: one call of :func:`viq.train.engine.train_step`, the step the training loop runs. Random
weights only: the figures measure layout and kernels, not model quality. Two variants, same samples, same model, same run:

* ``packed``: TrainModel's own path. All images at native size in one packed ViT pass; the
  conversations (text + projected image tokens) first-fit packed into rows of ``--max-length``
  tokens with :func:`viq.mllm.packing.pack_sequences` (attention kept inside each conversation).
* ``padded``: what a LLaVA-style trainer does. Every image zero-padded to the largest height and
  the largest width in the batch (so it makes more patch tokens, more FSQ/recon work, a bigger VAE
  target and more LLM image tokens: that is the cost measured), and every conversation in its own
  row, right-padded to the longest one, with a 2-D padding ``attention_mask`` (the standard
  Hugging Face batch): TrainModel's ``llm_rows="padded"`` layout; everything else is the same code.

Timings (``bench.common.best_time``, best of ``--repeats`` after one warm-up, synchronised):
``step`` = :func:`~viq.train.engine.train_step` (forward + backward + clip + AdamW step + zero_grad +
LR schedule step); ``forward`` = the forward half alone, with the step's loss combination
(:func:`~viq.train.engine.combine_losses`; graph built, then dropped), so backward + optimizer = step - forward. Rates count real work only:
LLM tokens/s counts the spliced tokens of the native-size samples (text + native image tokens, no
padding), patch tokens/s the native images' patches, for both variants. The work actually done
(padding included) is recorded too. Peak memory (``torch.cuda.max_memory_allocated``) on CUDA.

    python -m bench.train_step                                 # CPU, small config, float32
    python -m bench.train_step --shape gpu                     # CUDA: SigLIP2-g 16k + Qwen2.5-0.5B, bf16
    python -m bench.train_step --shape gpu --llm-mode lora
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import best_time, mixed_sizes, write_record
from viq.formats.image import padded_grid
from viq.mllm.adapters import prepare_llm, trainable_parameter_count
from viq.mllm.chat import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from viq.mllm.packing import first_fit_rows
from viq.mllm.projector import MMProjector
from viq.model.config import (
    DecoderConfig,
    EncoderConfig,
    HeadConfig,
    VAEConfig,
    ViQConfig,
    get_preset,
)
from viq.model.vae import build_vae
from viq.train.config import TrainConfig
from viq.train.engine import (
    autocast_context,
    combine_losses,
    loss_weights,
    prepare_model,
    train_step,
)
from viq.train.model import TrainBatch, TrainModel
from viq.train.optim import build_optimizer, build_scheduler


@dataclass
class Shape:
    """Model sizes and workload defaults of one ``--shape``."""

    config: ViQConfig
    llm: dict[str, Any]
    device: str
    autocast: bool  # bf16 autocast (fp32 master weights), as the engine does on CUDA
    checkpointing: bool
    samples: int
    min_side: int
    max_side: int
    max_length: int
    teacher_size: int


def make_shape(name: str) -> Shape:
    if name == "gpu":
        # SigLIP2-g/16 + the 16k FSQ head; Qwen2.5-0.5B's architecture (random weights).
        llm = {
            "hidden_size": 896,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "intermediate_size": 4864,
            "vocab_size": 151936,
            "tie_word_embeddings": True,
            "rope_theta": 1e6,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "use_sliding_window": False,
        }
        return Shape(
            get_preset("viq-g-16k"),
            llm,
            "cuda",
            True,
            True,
            samples=16,
            min_side=224,
            max_side=768,
            max_length=4096,
            teacher_size=384,
        )
    if name == "cpu":
        # Small enough for a 2-core CPU; every part of the stage 2-2 model is present.
        config = ViQConfig(
            name="bench-train-cpu",
            encoder=EncoderConfig(width=128, depth=4, num_heads=4, mlp_hidden=512, pos_grid=32),
            head=HeadConfig(num_heads=4, attn_dim=32),
            decoder=DecoderConfig(latent_heads=4),
            vae=VAEConfig(base_dim=4),
        )
        llm = {
            "hidden_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 512,
            "vocab_size": 1000,
            "tie_word_embeddings": True,
            "rope_theta": 1e6,
            "max_position_embeddings": 4096,
        }
        return Shape(
            config, llm, "cpu", False, False, samples=8, min_side=64, max_side=192, max_length=1024, teacher_size=128
        )
    raise ValueError(f"unknown shape {name!r}")


def conversations(
    n: int, vocab: int, prompt: tuple[int, int], answer: tuple[int, int], seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random (input_ids, labels): a prompt with one image placeholder, then a supervised answer."""
    rng = random.Random(seed + 1)
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(n):
        p, a = rng.randint(*prompt), rng.randint(*answer)
        ids = torch.randint(0, vocab, (p + a,), generator=g)
        ids[rng.randrange(p)] = IMAGE_PLACEHOLDER_ID
        labels = ids.clone()
        labels[:p] = IGNORE_INDEX
        out.append((ids, labels))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--shape",
        default="cpu",
        choices=["cpu", "gpu"],
        help="cpu: small config, float32 (default); gpu: SigLIP2-g 16k + Qwen2.5-0.5B, bf16 autocast, "
        "gradient checkpointing",
    )
    ap.add_argument("--device", default=None, help="default: cpu for --shape cpu, cuda for --shape gpu")
    ap.add_argument("--llm-mode", default="full", choices=["full", "lora"])
    ap.add_argument("--samples", type=int, default=None, help="samples per micro-batch (default 8 cpu / 16 gpu)")
    ap.add_argument("--min-side", type=int, default=None, help="smallest sqrt(area) (default 64 cpu / 224 gpu)")
    ap.add_argument("--max-side", type=int, default=None, help="largest sqrt(area) (default 192 cpu / 768 gpu)")
    ap.add_argument(
        "--prompt-len",
        type=int,
        nargs=2,
        default=(16, 128),
        metavar=("MIN", "MAX"),
        help="prompt text tokens (the image placeholder is one of them)",
    )
    ap.add_argument(
        "--answer-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"), help="supervised answer tokens"
    )
    ap.add_argument("--max-length", type=int, default=None, help="packed LLM row length (default 1024 cpu / 4096 gpu)")
    ap.add_argument(
        "--teacher-size", type=int, default=None, help="distillation teacher view (default 128 cpu / 384 gpu)"
    )
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--attention", default="auto", help="viq attention backend")
    ap.add_argument("--no-checkpointing", action="store_true", help="gpu shape: turn gradient checkpointing off")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    ap.add_argument("--out", default=None, help="JSON path (default: bench/results/train_step-<device>-<time>.json)")
    args = ap.parse_args(argv)

    shape = make_shape(args.shape)
    for name in ("device", "samples", "min_side", "max_side", "max_length", "teacher_size"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(shape, name))
    checkpointing = shape.checkpointing and not args.no_checkpointing
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = shape.config
    torch.manual_seed(args.seed)

    from transformers import Qwen2Config, Qwen2ForCausalLM

    llm_config = Qwen2Config(**shape.llm, attn_implementation="sdpa")
    llm = prepare_llm(Qwen2ForCausalLM(llm_config), args.llm_mode)
    projector = MMProjector(config.width, llm_config.hidden_size)
    # The default recipe's losses and optimiser, at a constant learning rate.
    cfg = TrainConfig.from_dict(
        {
            "stage": "stage2_2",
            "optim": {"lr": args.lr, "warmup_ratio": 0.0, "min_lr_ratio": 1.0},
            "train": {
                "precision": "bf16" if shape.autocast else "fp32",
                "gradient_checkpointing": checkpointing,
                "attention": args.attention,
            },
        }
    )
    model = TrainModel(
        cfg.stage,
        config,
        llm=llm,
        projector=projector,
        vae=build_vae(config.vae),
        teacher_size=args.teacher_size,
        max_length=args.max_length,
    )
    model.snapshot_teacher()
    prepare_model(model, cfg)
    model.to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    autocast = autocast_context(cfg, device)
    weights = loss_weights(cfg)

    # ---------------------------------------------------------------- the workload
    p = config.encoder.patch_size
    sizes = mixed_sizes(args.samples, args.min_side, args.max_side, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    images = [torch.rand(3, h, w, generator=g).mul(2).sub(1) for h, w in sizes]
    convs = conversations(
        args.samples, llm_config.vocab_size, tuple(args.prompt_len), tuple(args.answer_len), args.seed
    )
    max_h = max(padded_grid(h, w, p)[0] for h, w in sizes) * p
    max_w = max(padded_grid(h, w, p)[1] for h, w in sizes) * p
    padded_images = [F.pad(x, (0, max_w - x.shape[2], 0, max_h - x.shape[1])) for x in images]
    per_sample = [1] * args.samples
    ids = [str(i) for i in range(args.samples)]
    batches = {
        "packed": TrainBatch(images=images, conversations=convs, images_per_sample=per_sample, ids=ids).to(device),
        "padded": TrainBatch(images=padded_images, conversations=convs, images_per_sample=per_sample, ids=ids).to(
            device
        ),
    }

    grids = [padded_grid(h, w, p) for h, w in sizes]
    real_patches = sum(h * w for h, w in grids)
    real_llm = [len(ids_) - 1 + projector.num_tokens(gr) for (ids_, _), gr in zip(convs, grids)]
    if max(real_llm) > args.max_length:
        raise SystemExit(f"a conversation has {max(real_llm)} LLM tokens > --max-length {args.max_length}")
    pad_grid = (max_h // p, max_w // p)
    padded_llm = [len(ids_) - 1 + projector.num_tokens(pad_grid) for ids_, _ in convs]
    n_tokens = float(batches["packed"].num_supervised_tokens)
    n_images = float(args.samples)
    # Rows of the packed LLM batch: pack_sequences' own first fit.
    fill = [sum(real_llm[i] for i in row) for row in first_fit_rows(real_llm, args.max_length)]
    work = {
        "packed": {
            "patch_tokens": real_patches,
            "llm_rows": len(fill),
            "llm_row_length": max(fill),
            "llm_positions": len(fill) * max(fill),
        },
        "padded": {
            "patch_tokens": args.samples * pad_grid[0] * pad_grid[1],
            "llm_rows": args.samples,
            "llm_row_length": max(padded_llm),
            "llm_positions": args.samples * max(padded_llm),
        },
    }

    # ---------------------------------------------------------------- timing
    losses: dict[str, float] = {}

    def forward(name: str) -> Callable[[], None]:
        def run() -> None:
            with autocast:
                loss, _ = combine_losses(model(batches[name]), weights, n_tokens, n_images)
            losses[name] = float(loss.detach())

        return run

    def step(name: str) -> Callable[[], None]:
        def run() -> None:
            train_step(model, batches[name], optimizer, scheduler, cfg, device=device, autocast=autocast)

        return run

    figures: dict[str, dict[str, Any]] = {}
    for name in ("packed", "padded"):
        model.llm_rows = name
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            fwd = best_time(forward(name), device, args.repeats)
            sec = best_time(step(name), device, args.repeats)
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            figures[name] = {"error": "out of memory", **work[name]}
            print(f"{name:7s} out of memory", file=sys.stderr)
            continue
        optimizer.zero_grad(set_to_none=True)
        figures[name] = {
            "step_s": sec,
            "forward_s": fwd,
            "backward_and_optimizer_s": sec - fwd,
            "samples_per_s": args.samples / sec,
            "llm_tokens_per_s": sum(real_llm) / sec,
            "patch_tokens_per_s": real_patches / sec,
            "loss": losses[name],
            **work[name],
        }
        if device.type == "cuda":
            figures[name]["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

    # ---------------------------------------------------------------- report
    print(
        f"{'variant':8s} {'step s':>8s} {'fwd s':>8s} {'samples/s':>10s} {'LLM tok/s':>10s} {'patch tok/s':>11s} "
        f"{'LLM rows x len':>15s} {'patches':>8s}" + (f" {'peak GiB':>9s}" if device.type == "cuda" else ""),
        file=sys.stderr,
    )
    for name, f in figures.items():
        rows = f"{f['llm_rows']} x {f['llm_row_length']}"
        if "error" in f:
            print(f"{name:8s} {f['error']:>41s} {'':10s} {'':11s} {rows:>15s} {f['patch_tokens']:8d}", file=sys.stderr)
            continue
        print(
            f"{name:8s} {f['step_s']:8.3f} {f['forward_s']:8.3f} {f['samples_per_s']:10.2f} "
            f"{f['llm_tokens_per_s']:10.0f} {f['patch_tokens_per_s']:11.0f} {rows:>15s} {f['patch_tokens']:8d}"
            + (f" {f['peak_memory_gib']:9.2f}" if "peak_memory_gib" in f else ""),
            file=sys.stderr,
        )
    ok = all("error" not in f for f in figures.values())
    pk, pd = figures["packed"], figures["padded"]
    ratios = {
        "packed_vs_padded_step_speedup": pd["step_s"] / pk["step_s"] if ok else None,
        "packed_vs_padded_forward_speedup": pd["forward_s"] / pk["forward_s"] if ok else None,
        "packed_vs_padded_peak_memory": (
            pk["peak_memory_gib"] / pd["peak_memory_gib"] if ok and "peak_memory_gib" in pk else None
        ),
        "patch_padding_waste": 1 - real_patches / pd["patch_tokens"],
        "llm_padding_waste_padded": 1 - sum(real_llm) / pd["llm_positions"],
        "llm_padding_waste_packed": 1 - sum(real_llm) / pk["llm_positions"],
    }
    for k, v in ratios.items():
        if v is not None:
            print(f"{k}: {v:.3f}", file=sys.stderr)
    record = {
        "shape": args.shape,
        "precision": "bf16 autocast, fp32 weights" if shape.autocast else "float32",
        "gradient_checkpointing": checkpointing,
        "llm_mode": args.llm_mode,
        "config": config.to_dict(),
        "llm_config": shape.llm,
        "trainable_parameters": trainable_parameter_count(model),
        "args": vars(args),
        "workload": {
            "image_sizes": sizes,
            "padded_image_size": [max_h, max_w],
            "text_lengths": [len(ids_) for ids_, _ in convs],
            "llm_lengths": real_llm,
            "supervised_tokens": int(n_tokens),
            "patch_tokens": real_patches,
            "llm_tokens": sum(real_llm),
        },
        "figures": figures,
        "ratios": ratios,
    }
    path = write_record("train_step", device, record, args.out)
    print(f"wrote {path}", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
