"""Encoding throughput: packed native resolution vs padding vs a fixed-size batch vs a dense ViT.

Four ways to encode, all in the same run on the same random-weight model:

* ``packed``: the mixed-resolution set at native size, NaViT-packed up to ``--batch-tokens``.
* ``padded``: the same images zero-padded to the largest size in the set, run as dense batches.
* ``fixed``: the same number of images, all at one size (``--fixed-size``), through the packed path.
* ``dense_vit``: the ``fixed`` batch through a plain dense ViT forward (B, N, C) with the same weights
  (the trunk only) -- the baseline the packed path must match on equal fixed-size work; compared with
  ``fixed_trunk`` (our packed trunk on the same batch).

Reports images/s, tokens/s (real patch tokens; padding does not count) and TFLOP/s (measured with
``torch.utils.flop_counter`` on the actual work done, padding included), and the ratios the targets
are stated in. Writes a JSON record under ``bench/results/``.

    python -m bench.encode_throughput                       # CPU, small config
    python -m bench.encode_throughput --device cuda --dtype bfloat16 --preset viq-g-16k \\
        --num-images 64 --min-side 224 --max-side 1024 --batch-tokens 32768 --fixed-size 512
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

import viq
from bench.common import best_time, mixed_sizes, write_record
from viq.formats.image import padded_grid
from viq.model.config import EncoderConfig, HeadConfig, ViQConfig, get_preset
from viq.model.encoder import pad_to_patches, resize_pos_embed
from viq.model.viq import pack_by_budget


def bench_config(name: str) -> ViQConfig:
    if name == "bench-cpu":
        # Small enough for a 2-core CPU, big enough that matrix work dominates.
        return ViQConfig(
            name="bench-cpu",
            encoder=EncoderConfig(width=256, depth=6, num_heads=4, mlp_hidden=1024, pos_grid=64, pool_head=False),
            head=HeadConfig(attn_dim=64, num_heads=4),
        )
    return get_preset(name)


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@torch.inference_mode()
def dense_vit_trunk(encoder, batch: torch.Tensor) -> torch.Tensor:
    """A plain dense ViT forward (B, N, C) with the encoder's weights: the reference implementation."""
    x = encoder.patch_embed.proj(batch).flatten(2).transpose(1, 2)
    grid = (batch.shape[2] // encoder.cfg.patch_size, batch.shape[3] // encoder.cfg.patch_size)
    x = x + resize_pos_embed(encoder.pos_embed, grid)
    b, n, c = x.shape
    for blk in encoder.blocks:
        h = blk.norm1(x)
        heads = blk.attn.num_heads
        q, k, v = blk.attn.qkv(h).view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + blk.attn.proj(a)
        x = x + blk.mlp(blk.norm2(x))
    return x


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench-cpu", help="viq preset name, or bench-cpu (default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--num-images", type=int, default=12)
    ap.add_argument("--min-side", type=int, default=128, help="smallest sqrt(area) in the mixed set")
    ap.add_argument("--max-side", type=int, default=384, help="largest sqrt(area) in the mixed set")
    ap.add_argument("--fixed-size", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    ap.add_argument(
        "--out", default=None, help="JSON path (default: bench/results/encode_throughput-<device>-<time>.json)"
    )
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = bench_config(args.preset)
    torch.manual_seed(args.seed)
    model = viq.ViQModel(config, components=["encoder"]).to(device=device, dtype=dtype).eval()
    model.set_attention_backend(args.attention)
    p = config.encoder.patch_size

    sizes = mixed_sizes(args.num_images, args.min_side, args.max_side, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    images = [torch.rand(3, h, w, generator=g).mul(2).sub(1).to(device, dtype) for h, w in sizes]
    real_tokens = sum(math.prod(padded_grid(h, w, p)) for h, w in sizes)

    # padded: every image padded to the largest H and W of the set, dense batches of equal size
    max_h = max(padded_grid(h, w, p)[0] for h, w in sizes) * p
    max_w = max(padded_grid(h, w, p)[1] for h, w in sizes) * p
    padded = [F.pad(x, (0, max_w - x.shape[2], 0, max_h - x.shape[1])) for x in images]
    fixed = [
        torch.rand(3, args.fixed_size, args.fixed_size, generator=g).mul(2).sub(1).to(device, dtype)
        for _ in range(args.num_images)
    ]
    fixed_tokens = args.num_images * (args.fixed_size // p) ** 2

    def encode_all(pixels):
        def run():
            for pack in pack_by_budget(
                [math.prod(padded_grid(x.shape[1], x.shape[2], p)) for x in pixels], args.batch_tokens
            ):
                model.indices_packed([pixels[i] for i in pack])

        return run

    def trunk_packed(pixels):
        def run():
            with torch.inference_mode():
                for pack in pack_by_budget(
                    [math.prod(padded_grid(x.shape[1], x.shape[2], p)) for x in pixels], args.batch_tokens
                ):
                    model.encoder([pad_to_patches(pixels[i], p) for i in pack])

        return run

    def trunk_dense(pixels):
        per = max(1, args.batch_tokens // ((pixels[0].shape[1] // p) * (pixels[0].shape[2] // p)))

        def run():
            for i in range(0, len(pixels), per):
                dense_vit_trunk(model.encoder, torch.stack(pixels[i : i + per]))

        return run

    runs = {
        "packed": (encode_all(images), real_tokens),
        "padded": (encode_all(padded), real_tokens),
        "fixed": (encode_all(fixed), fixed_tokens),
        "fixed_trunk": (trunk_packed(fixed), fixed_tokens),
        "dense_vit": (trunk_dense(fixed), fixed_tokens),
    }
    figures = {}
    for name, (fn, tokens) in runs.items():
        seconds = best_time(fn, device, args.repeats)
        flops = count_flops(fn)
        figures[name] = {
            "seconds": seconds,
            "images_per_s": args.num_images / seconds,
            "tokens_per_s": tokens / seconds,
            "tflops_per_s": flops / seconds / 1e12,
            "gflops": flops / 1e9,
        }
        print(
            f"{name:12s} {seconds:8.3f} s  {args.num_images / seconds:8.2f} img/s  {tokens / seconds:10.0f} tok/s  "
            f"{flops / seconds / 1e12:7.3f} TFLOP/s",
            file=sys.stderr,
        )
    ratios = {
        "packed_vs_padded_images_per_s": figures["packed"]["images_per_s"] / figures["padded"]["images_per_s"],
        "packed_trunk_vs_dense_vit_fixed": figures["fixed_trunk"]["seconds"]
        and figures["dense_vit"]["seconds"] / figures["fixed_trunk"]["seconds"],
        "padding_waste": 1 - real_tokens / (args.num_images * (max_h // p) * (max_w // p)),
    }
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}", file=sys.stderr)
    record = {
        "dtype": args.dtype,
        "attention": args.attention,
        "config": config.to_dict(),
        "args": vars(args),
        "image_sizes": sizes,
        "figures": figures,
        "ratios": ratios,
    }
    path = write_record("encode_throughput", device, record, args.out)
    print(f"wrote {path}", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
