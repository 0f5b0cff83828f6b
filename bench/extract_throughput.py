"""End-to-end extraction throughput: file read -> decode -> preprocess -> encode -> store.

Writes a folder of mixed-size JPEG/PNG images (sizes drawn between ``--min-side`` and ``--max-side``,
aspect ratios 1:3 to 3:1), then runs :func:`viq.extract.extract` into a fresh store and reports
images/s and the share of the wall time spent in the model (how busy the data path keeps the
accelerator; the target on GPU is >= 90 %), for several DataLoader worker counts.

    python bench/extract_throughput.py                                 # CPU, small config
    python bench/extract_throughput.py --device cuda --dtype bfloat16 --preset viq-g-16k \\
        --num-images 2000 --min-side 224 --max-side 1024 --workers 4 8 12 --batch-tokens 32768
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_record  # noqa: E402

import viq  # noqa: E402
from viq.extract import extract  # noqa: E402


def make_images(folder: Path, n: int, lo: int, hi: int, seed: int) -> None:
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        area = rng.uniform(lo * lo, hi * hi)
        aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
        h, w = max(16, round(math.sqrt(area / aspect))), max(16, round(math.sqrt(area * aspect)))
        # smooth content (gradients + noise) so JPEG decoding cost is realistic
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) % 256)], -1)
        img = np.clip(base + np_rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / (f"{i:05d}.jpg" if i % 2 else f"{i:05d}.png"), quality=90)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="viq-demo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--num-images", type=int, default=64)
    ap.add_argument("--min-side", type=int, default=96)
    ap.add_argument("--max-side", type=int, default=384)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="viq-extract-bench-"))
    try:
        make_images(tmp / "images", args.num_images, args.min_side, args.max_side, args.seed)
        torch.manual_seed(args.seed)
        model = viq.ViQModel.from_config(args.preset, components=["encoder"]).to(device, getattr(torch, args.dtype))
        figures = {}
        for workers in args.workers:
            store = tmp / f"store-{workers}"
            r = extract(None, tmp / "images", store, model=model, num_workers=workers, batch_tokens=args.batch_tokens,
                        progress=False, return_timing=True, flush_every=256)
            r["images_per_s"] = r["encoded"] / r["wall_s"]
            r["model_busy_share"] = r["encode_s"] / r["wall_s"]
            figures[f"workers={workers}"] = r
            print(f"workers {workers}: {r['images_per_s']:.2f} img/s, model busy {100 * r['model_busy_share']:.0f}% "
                  f"({r['encoded']} images, {r['wall_s']:.1f} s)", file=sys.stderr)
        record = {"args": vars(args), "config": model.config.to_dict(), "figures": figures}
        path = write_record("extract_throughput", device, record, args.out)
        print(f"wrote {path}", file=sys.stderr)
        return record
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
