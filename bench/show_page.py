"""How fast ``viq show`` makes its page and how large the page gets, beside ``viq eval-recon`` on the same
images in the same run (the baseline a user already waits for).

Per image: :func:`viq.eval.show.inspect_image` (encode, reconstruct, score, thumbnails, error map) vs
:func:`viq.eval.recon.evaluate_reconstruction` with its command-line defaults (JPEG / WebP matched to the
codes' bitrate plus the rate-distortion curves); then the page itself (:func:`viq.eval.show.render_page`,
galleries included): seconds and bytes, per image. ``--page-images N`` also renders a page of ``N``
images (the first images repeated) and reports its size, the "a page of 1000 images" question.

    python -m bench.show_page --images 100 --page-images 1000
    python -m bench.show_page --model viq-demo/runs/drawer/final --images 100 --page-images 1000
    python -m bench.show_page --images 100 --page-images 1000 --thumb 128
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import mixed_sizes, write_record


def _texture(h: int, w: int, seed: int) -> Image.Image:
    """Smooth colour waves plus fine noise: compresses like a photograph, not like white noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = (
        np.stack(
            [np.sin(rng.uniform(3, 12) * x + c) * np.cos(rng.uniform(2, 9) * y - c) for c in rng.uniform(0, 3, 3)], -1
        )
        * 0.4
        + 0.5
    )
    arr = np.clip(base + rng.normal(0, 0.03, base.shape), 0, 1)
    return Image.fromarray((arr * 255).round().astype(np.uint8))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default=None,
        help="a model directory (default: the viq-demo preset, random weights: the demo's compute)",
    )
    parser.add_argument("--images", type=int, default=100, help="images timed (default 100)")
    parser.add_argument("--min-side", type=int, default=128, help="smallest typical side (default 128)")
    parser.add_argument("--max-side", type=int, default=384, help="largest typical side (default 384)")
    parser.add_argument("--thumb", type=int, default=256, help="viq show --thumb (default 256)")
    parser.add_argument("--page-images", type=int, default=0, help="also render a page of this many images (0: no)")
    parser.add_argument("--out", default=None, help="record path (default bench/results/show_page-...json)")
    args = parser.parse_args(argv)

    from viq.eval.recon import evaluate_reconstruction
    from viq.eval.show import inspect_image, render_page
    from viq.formats.image import PreprocessConfig
    from viq.model.viq import ViQModel

    torch.manual_seed(0)
    model = (ViQModel.from_pretrained(args.model) if args.model else ViQModel.from_config("viq-demo", seed=0)).eval()
    sizes = mixed_sizes(args.images, args.min_side, args.max_side, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, (h, w) in enumerate(sizes):
            files.append(str(Path(tmp) / f"{i:05d}.png"))
            _texture(h, w, i).save(files[-1])
        cfg = PreprocessConfig(patch_size=model.patch_size)
        inspect_image(model, files[0], cfg)  # warm-up: kernels, lazy imports
        evaluate_reconstruction(model, files[:1], preprocess=cfg)

        t = time.perf_counter()
        views = [inspect_image(model, f, cfg, thumb=args.thumb) for f in files]
        inspect_s = time.perf_counter() - t
        t = time.perf_counter()
        page = render_page(views, title="bench", preprocess=cfg, thumb=args.thumb)
        render_s = time.perf_counter() - t
        t = time.perf_counter()
        evaluate_reconstruction(model, files, preprocess=cfg)
        recon_s = time.perf_counter() - t

        big = None
        if args.page_images:
            many = [views[i % len(views)] for i in range(args.page_images)]
            t = time.perf_counter()
            big_page = render_page(many, title="bench", preprocess=cfg, thumb=args.thumb)
            big = {"images": args.page_images, "bytes": len(big_page.encode()), "render_s": time.perf_counter() - t}

    n = len(files)
    pixels = sum(h * w for h, w in sizes)
    record = {
        "model": args.model or "viq-demo preset (random weights)",
        "thumb": args.thumb,
        "images": n,
        "sides": [args.min_side, args.max_side],
        "megapixels": pixels / 1e6,
        "show_s_per_image": (inspect_s + render_s) / n,
        "show_inspect_s_per_image": inspect_s / n,
        "show_render_s_per_image": render_s / n,
        "eval_recon_s_per_image": recon_s / n,
        "show_vs_eval_recon": (inspect_s + render_s) / recon_s,
        "page_bytes": len(page.encode()),
        "page_bytes_per_image": len(page.encode()) / n,
        "big_page": big,
    }
    path = write_record("show_page", torch.device("cpu"), record, out=args.out)
    print(
        f"{n} images ({pixels / 1e6:.1f} Mpx): viq show {record['show_s_per_image'] * 1e3:.0f} ms/image "
        f"(render {record['show_render_s_per_image'] * 1e3:.1f}), viq eval-recon {record['eval_recon_s_per_image'] * 1e3:.0f} "
        f"ms/image: ratio {record['show_vs_eval_recon']:.2f}; page {record['page_bytes'] / 1e6:.2f} MB, "
        f"{record['page_bytes_per_image'] / 1e3:.0f} kB/image"
        + (f"; {big['images']} images: {big['bytes'] / 1e6:.1f} MB in {big['render_s']:.1f} s" if big else "")
    )
    print(path)
    return record


if __name__ == "__main__":
    main()
