"""Peer benchmark: viq's any-resolution trunk against transformers' ``Siglip2VisionModel`` (NaFlex).

Both run the same SigLIP2 weights (a transformers ``Siglip2Model`` at giant-opt vision widths, random
weights, written by :func:`viq.demo.public_checkpoints.hf_siglip2_naflex` and read by viq's
``hf-siglip:`` loader) on the same mixed-size images:

* transformers: the NaFlex path as its processor feeds it -- every image as a row of
  ``(num_patches, 3*16*16)`` patches, rows padded to the longest with ``pixel_attention_mask``, the 16x16
  position table resized to each image's grid (bilinear, antialiased), one padded batch;
* viq: :class:`viq.model.encoder.ViTEncoder` (+ its final LayerNorm and MAP head), the images packed
  into one sequence with per-image attention (NaViT), the table resized bilinearly per image.

Reported: agreement of the per-patch features (after the final LayerNorm) and of the pooled MAP
embeddings -- max |difference| over max |value|, float32 -- and images/s of each, best of
``--repeats``. The images' grids are at least 16 patches a side, where the two position resizes are the
same function (antialiasing only changes a downsized table); below that they differ by design.

    python -m bench.peer_siglip2                         # CPU, 4 of giant-opt's 40 layers, float32
    python -m bench.peer_siglip2 --device cuda --layers 40 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import best_time, write_record
from viq.demo.public_checkpoints import VisionWidths, hf_siglip2_naflex

#: Image sizes (H, W) in pixels: grids of at least 16 patches a side, mixed aspect ratios.
SIZES = [(256, 384), (384, 256), (320, 320), (256, 512), (448, 288), (288, 448), (256, 256), (352, 416)]


def hf_patches(pixels: list[torch.Tensor], patch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(3, H, W) images -> NaFlex inputs: pixel_values (B, N, p*p*3) in (py, px, c) order per patch, row-major
    over the grid, zero rows after each image's own; pixel_attention_mask (B, N); spatial_shapes (B, 2)."""
    rows, shapes = [], []
    for x in pixels:
        c, h, w = x.shape
        gh, gw = h // patch, w // patch
        p = x.reshape(c, gh, patch, gw, patch).permute(1, 3, 2, 4, 0).reshape(gh * gw, patch * patch * c)
        rows.append(p)
        shapes.append((gh, gw))
    n = max(r.shape[0] for r in rows)
    values = torch.zeros(len(rows), n, rows[0].shape[1], dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        values[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = 1
    return values, mask, torch.tensor(shapes)


def run(args: argparse.Namespace) -> dict:
    from transformers import Siglip2VisionModel

    from viq.model.config import EncoderConfig
    from viq.model.encoder import ViTEncoder
    from viq.train.init import load_siglip

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    widths = VisionWidths(hidden=args.width, heads=args.heads, mlp=args.mlp, layers=args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        folder = hf_siglip2_naflex(Path(tmp) / "siglip2", widths, seed=0)
        hf = Siglip2VisionModel.from_pretrained(folder, torch_dtype=dtype, attn_implementation="sdpa")
        encoder_config, state = load_siglip("hf-siglip", str(folder), {}).native_encoder()
    hf = hf.to(device).eval()
    encoder = ViTEncoder(EncoderConfig(**{**encoder_config.__dict__}))
    missing, unexpected = encoder.load_state_dict({k[len("encoder.") :]: v for k, v in state.items()}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    encoder = encoder.to(device, dtype).eval()

    g = torch.Generator().manual_seed(0)
    sizes = (SIZES * (args.images // len(SIZES) + 1))[: args.images]
    pixels = [torch.rand(3, h, w, generator=g) * 2 - 1 for h, w in sizes]
    values, mask, shapes = hf_patches(pixels, widths.patch)
    values, mask, shapes = values.to(device, dtype), mask.to(device), shapes.to(device)
    images = [x.to(device, dtype) for x in pixels]

    @torch.inference_mode()
    def run_hf():
        out = hf(pixel_values=values, pixel_attention_mask=mask, spatial_shapes=shapes)
        return out.last_hidden_state, out.pooler_output

    @torch.inference_mode()
    def run_viq():
        tokens, packed = encoder(images)
        features = packed.split(tokens)
        return [encoder.pool.norm_in(f) for f in features], encoder.pool(features)

    hf_tokens, hf_pooled = run_hf()
    viq_tokens, viq_pooled = run_viq()
    feature_err = max(float((a.float() - b[: a.shape[0]].float()).abs().max()) for a, b in zip(viq_tokens, hf_tokens))
    feature_scale = max(float(b.float().abs().max()) for b in hf_tokens)
    pooled_err = float((viq_pooled.float() - hf_pooled.float()).abs().max())
    pooled_scale = float(hf_pooled.float().abs().max())
    t_hf = best_time(run_hf, device, args.repeats)
    t_viq = best_time(run_viq, device, args.repeats)
    patches = sum((h // widths.patch) * (w // widths.patch) for h, w in sizes)
    padded = values.shape[0] * values.shape[1]
    return {
        "config": {
            "widths": widths.__dict__,
            "images": len(sizes),
            "sizes": sizes,
            "dtype": args.dtype,
            "patches": patches,
            "padded_patches": padded,
        },
        "agreement": {
            "features_max_abs_diff": feature_err,
            "features_max_abs": feature_scale,
            "features_relative": feature_err / feature_scale,
            "pooled_max_abs_diff": pooled_err,
            "pooled_max_abs": pooled_scale,
            "pooled_relative": pooled_err / pooled_scale,
        },
        "transformers": {"seconds": t_hf, "images_per_s": len(sizes) / t_hf, "patches_per_s": patches / t_hf},
        "viq": {"seconds": t_viq, "images_per_s": len(sizes) / t_viq, "patches_per_s": patches / t_viq},
        "speedup": t_hf / t_viq,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--width", type=int, default=1536, help="giant-opt: 1536")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--mlp", type=int, default=6144)
    p.add_argument("--layers", type=int, default=4, help="of giant-opt's 40 (CPU time)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="record path (default: bench/results/peer_siglip2-<device>-<time>.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    record = run(args)
    path = write_record("peer_siglip2", torch.device(args.device), record, args.out)
    a = record["agreement"]
    print(
        f"features: max |diff| {a['features_max_abs_diff']:.2e} of {a['features_max_abs']:.2f} "
        f"({a['features_relative']:.1e}); pooled {a['pooled_relative']:.1e}"
    )
    print(
        f"images/s: viq {record['viq']['images_per_s']:.2f}, transformers {record['transformers']['images_per_s']:.2f} "
        f"(viq {record['speedup']:.2f}x)"
    )
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
