"""End-to-end extraction throughput: read -> decode -> preprocess -> encode -> store, by input kind.

Writes mixed-size JPEG/PNG images (sizes drawn between ``--min-side`` and ``--max-side``, aspect
ratios 1:3 to 3:1) as a folder, as WebDataset tar shards (``--per-unit`` images each) and as Parquet
files (an image-bytes column and an id column, row groups of ``--per-unit`` rows), then runs
:func:`viq.extract.extract` into a fresh store for each input kind with the same model and worker
count, ``--repeats`` times in interleaved order, and reports for each the median and best images/s
and the median images per CPU-second (this process and its DataLoader workers; on a shared machine
the steadiest figure), the ratios tar/folder and parquet/folder of each (target >= 0.9), and the
share of the wall time spent in the model (how busy the data path keeps the accelerator; the target
on GPU is >= 90 %).

    python -m bench.extract_throughput                                 # CPU, small config
    python -m bench.extract_throughput --num-images 600 --min-side 64 --max-side 192 --repeats 3
    python -m bench.extract_throughput --device cuda --dtype bfloat16 --preset viq-g-16k \\
        --num-images 2000 --min-side 224 --max-side 1024 --workers 4 8 12 --batch-tokens 32768
"""

from __future__ import annotations

import argparse
import io
import math
import random
import resource
import shutil
import statistics
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import viq
from bench.common import write_record
from viq.extract import extract


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


INPUTS = ("folder", "tar", "parquet")


def _cpu_s() -> float:
    """CPU seconds used by this process and its finished children (DataLoader workers): unlike wall
    time, barely changed by other jobs on a shared machine."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def make_tar_and_parquet(folder: Path, tar_dir: Path, parquet_dir: Path, per_unit: int) -> None:
    """The folder's images as tar shards and as Parquet files, ``per_unit`` images per shard / row group
    (4 row groups per Parquet file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(folder.iterdir())
    tar_dir.mkdir(parents=True)
    parquet_dir.mkdir(parents=True)
    for s in range(0, len(files), per_unit):
        with tarfile.open(tar_dir / f"{s // per_unit:05d}.tar", "w") as tar:
            for f in files[s : s + per_unit]:
                data = f.read_bytes()
                info = tarfile.TarInfo(f.name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    per_file = 4 * per_unit
    for s in range(0, len(files), per_file):
        chunk = files[s : s + per_file]
        table = pa.table(
            {"image": pa.array([f.read_bytes() for f in chunk], pa.binary()), "id": [f.name for f in chunk]}
        )
        pq.write_table(table, parquet_dir / f"{s // per_file:05d}.parquet", row_group_size=per_unit)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="viq-demo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--num-images", type=int, default=64)
    ap.add_argument("--min-side", type=int, default=96)
    ap.add_argument("--max-side", type=int, default=384)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--inputs", nargs="+", choices=INPUTS, default=list(INPUTS))
    ap.add_argument("--per-unit", type=int, default=64, help="images per tar shard / Parquet row group")
    ap.add_argument("--repeats", type=int, default=1, help="runs per input kind and worker count (median taken)")
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="viq-extract-bench-"))
    try:
        make_images(tmp / "images", args.num_images, args.min_side, args.max_side, args.seed)
        make_tar_and_parquet(tmp / "images", tmp / "tar", tmp / "parquet", args.per_unit)
        sources = {"folder": tmp / "images", "tar": tmp / "tar", "parquet": tmp / "parquet"}
        columns = {"parquet": {"image_column": "image", "id_column": "id"}}
        torch.manual_seed(args.seed)
        model = viq.ViQModel.from_config(args.preset, components=["encoder"]).to(device, getattr(torch, args.dtype))
        figures, ratios = {}, {}
        for workers in args.workers:
            runs: dict[str, list[dict]] = {kind: [] for kind in args.inputs}
            for repeat in range(args.repeats):
                for kind in args.inputs:  # interleaved, so slow drifts of a shared machine hit every kind alike
                    store = tmp / f"store-{kind}-{workers}-{repeat}"
                    cpu0 = _cpu_s()
                    result = extract(
                        None,
                        sources[kind],
                        store,
                        model=model,
                        num_workers=workers,
                        batch_tokens=args.batch_tokens,
                        progress=False,
                        flush_every=256,
                        **columns.get(kind, {}),
                    )
                    r = {**result, "wall_s": result.wall_s, "encode_s": result.encode_s}
                    r["cpu_s"] = _cpu_s() - cpu0
                    r["images_per_s"] = r["encoded"] / r["wall_s"]
                    r["images_per_cpu_s"] = r["encoded"] / r["cpu_s"]
                    runs[kind].append(r)
                    shutil.rmtree(store, ignore_errors=True)
            for kind, rs in runs.items():
                median = statistics.median(x["images_per_s"] for x in rs)
                run = min(rs, key=lambda x: abs(x["images_per_s"] - median))
                f = {
                    **run,
                    "images_per_s": median,
                    "model_busy_share": run["encode_s"] / run["wall_s"],
                    "images_per_s_best": max(x["images_per_s"] for x in rs),
                    "images_per_cpu_s": statistics.median(x["images_per_cpu_s"] for x in rs),
                    "runs_images_per_s": [x["images_per_s"] for x in rs],
                    "runs_images_per_cpu_s": [x["images_per_cpu_s"] for x in rs],
                }
                figures[f"{kind}/workers={workers}"] = f
                print(
                    f"{kind:8s} workers {workers}: {median:.2f} img/s (median of {len(rs)}; best "
                    f"{f['images_per_s_best']:.2f}; {f['images_per_cpu_s']:.2f} img per CPU-s), model busy "
                    f"{100 * f['model_busy_share']:.0f}% ({run['encoded']} images, {run['wall_s']:.1f} s)",
                    file=sys.stderr,
                )
            if "folder" in runs:
                for kind in runs:
                    if kind == "folder":
                        continue
                    for metric in ("images_per_s", "images_per_s_best", "images_per_cpu_s"):
                        ratios[f"{kind}/folder/workers={workers}/{metric}"] = (
                            figures[f"{kind}/workers={workers}"][metric] / figures[f"folder/workers={workers}"][metric]
                        )
        for name, value in ratios.items():
            print(f"{name}: {value:.3f} (target >= 0.9)", file=sys.stderr)
        record = {
            "args": vars(args),
            "config": model.config.to_dict(),
            "figures": figures,
            "ratios": ratios,
            "target": "tar and parquet >= 0.9x folder images/s",
        }
        path = write_record("extract_throughput", device, record, args.out)
        print(f"wrote {path}", file=sys.stderr)
        return record
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
