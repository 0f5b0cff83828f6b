"""Peak memory of loading a ViQ release, against the bytes of the loaded model (issue 9, item 7).

Random weights are written in the official layout (``model_viq_fsq_16k.pth`` float32,
``embedder.pth`` and ``index_drawer.pth`` bfloat16), with the key names and shapes of the real 16k
release (``shared/reference/official-viq-keys-16k.tsv``: 2.06 B parameters, a 7.5 GB release) or of
the tiny golden fixture (``--layout tiny``, the quick mode), and optionally as a viq-format directory
(``config.json`` + float32 ``model.safetensors``, what ``viq convert`` writes). Each load then runs in
a fresh interpreter, which reports from ``/proc/self/status``:

* ``VmHWM``: the kernel's peak resident set (anonymous + file-backed + shared pages), reset with
  ``/proc/self/clear_refs`` after the imports, so it is the peak of the load (the interpreter,
  torch, viq and diffusers, ``baseline``, are part of it: resident memory never drops below them);
* ``RssAnon`` / ``RssFile`` at the peak, sampled every 5 ms (lower bounds of their true peaks);
* the loaded model's bytes (parameters and buffers, in their loaded dtype).

Reported: ``peak / model`` (everything resident, interpreter included) and ``(peak - baseline) / model``
(what the load added). The files are written under ``--workdir`` (default: a temporary folder in /tmp)
and deleted at the end.

    python -m bench.load_memory                        # 16k layout: ~16 GB written to /tmp, a few minutes
    python -m bench.load_memory --layout tiny          # the golden fixture's shapes, seconds
    python -m bench.load_memory --blocks 4             # 16k widths, 4 of the 40 trunk blocks
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.common import write_record

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
KEYS_16K = SHARED / "reference" / "official-viq-keys-16k.tsv"
FIXTURE = SHARED / "fixtures" / "official-viq"
ENCODER_FILE = "model_viq_fsq_16k.pth"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: safetensors dtype names
ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}

Layout = dict[str, list[tuple[str, tuple[int, ...], torch.dtype]]]  # file -> (key, shape, dtype)


# ============================================================================================ layouts


def layout_16k(tsv: Path = KEYS_16K, blocks: int | None = None) -> Layout:
    """The real release's files, keys, shapes and dtypes; ``blocks`` keeps only that many trunk blocks."""
    layout: Layout = {}
    with open(tsv) as f:
        for row in csv.DictReader(f, delimiter="\t"):
            key = row["key"]
            if blocks is not None and key.startswith("blocks.") and int(key.split(".")[1]) >= blocks:
                continue
            name = ENCODER_FILE if row["file"].startswith("model_viq_fsq_") else row["file"]
            layout.setdefault(name, []).append(
                (key, tuple(json.loads(row["shape_16k"])), DTYPES[row["dtype_as_written_by_converter"]])
            )
    return layout


def layout_of(directory: Path) -> Layout:
    """The layout of an official directory (read memory-mapped: shapes only)."""
    layout: Layout = {}
    for path in sorted(directory.glob("*.pth")):
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        layout[path.name] = [(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    return layout


def parameters(layout: Layout) -> int:
    return sum(math.prod(shape) for entries in layout.values() for _, shape, _ in entries)


# ============================================================================================ writing


def _random(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype).uniform_(-0.05, 0.05, generator=g)


def write_official(layout: Layout, out: Path, seed: int = 0) -> None:
    """One ``torch.save`` per file (the largest, the float32 encoder, is held in memory while written)."""
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for name, entries in layout.items():
        state = {key: _random(shape, dtype, g) for key, shape, dtype in entries}
        torch.save(state, out / name)
        del state


def write_viq(official: Path, out: Path, num_heads: int | None, seed: int = 1) -> None:
    """A float32 viq-format directory of the same architecture, streamed tensor by tensor (the
    safetensors layout: 8-byte header length, JSON header, raw little-endian data)."""
    from viq.model.official import (
        detect_config,
        load_official_state_dicts,
        map_official_state_dicts,
    )

    states = load_official_state_dicts(official)  # memory-mapped: only shapes are used
    config = detect_config(states, size_tag="16k", num_heads=num_heads, source=str(official))
    mapped, components = map_official_state_dicts(states, config, source=str(official))
    keys = sorted(mapped)
    header, offset = {}, 0
    for k in keys:
        n = math.prod(mapped[k].shape) * 4
        header[k] = {"dtype": "F32", "shape": list(mapped[k].shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "viq", "components": ",".join(components)}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.to_json() + "\n")
    g = torch.Generator().manual_seed(seed)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for k in keys:
            f.write(_random(tuple(mapped[k].shape), torch.float32, g).numpy().tobytes())


# ============================================================================================ measuring


def status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile, RssShmem of this process, in bytes (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def child(directory: str, dtype: str, num_heads: int | None) -> dict:
    """Load ``directory`` in this (fresh) process and report its memory."""
    import gc

    import viq

    try:  # the Qwen-Image VAE's library: code, not weights, so part of the baseline
        import diffusers  # noqa: F401
        from diffusers import AutoencoderKLQwenImage  # noqa: F401
    except ImportError:
        pass
    gc.collect()
    baseline = status()
    try:  # "5" resets the peak resident set (VmHWM) to the current one (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        peak_reset = True
    except OSError:
        peak_reset = False
    peaks = dict(baseline)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            s = status()
            if s["VmRSS"] >= peaks["VmRSS"]:
                peaks.update(VmRSS=s["VmRSS"], RssAnon_at_peak=s["RssAnon"], RssFile_at_peak=s["RssFile"])
            peaks["RssAnon"] = max(peaks["RssAnon"], s["RssAnon"])
            peaks["RssFile"] = max(peaks["RssFile"], s["RssFile"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    kwargs = {"num_heads": num_heads} if num_heads and not (Path(directory) / "model.safetensors").is_file() else {}
    model = viq.load(directory, dtype=DTYPES[dtype], **kwargs)
    seconds = time.perf_counter() - t
    done.set()
    sampler.join()
    final = status()
    tensors = [*model.parameters(), *model.buffers()]
    model_bytes = sum(x.numel() * x.element_size() for x in tensors)
    peak = final["VmHWM"]
    return {
        "dtype": dtype,
        "seconds": round(seconds, 2),
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "model_bytes": model_bytes,
        "baseline_rss": baseline["VmRSS"],
        "peak_rss": peak,
        "peak_rss_reset_after_imports": peak_reset,
        "final_rss": final["VmRSS"],
        "final_rss_anon": final["RssAnon"],
        "final_rss_file": final["RssFile"],
        "sampled_peak_rss_anon": peaks["RssAnon"],
        "sampled_peak_rss_file": peaks["RssFile"],
        "sampled_at_peak": {k: peaks.get(k) for k in ("VmRSS", "RssAnon_at_peak", "RssFile_at_peak")},
        "peak_over_model": round(peak / model_bytes, 4),
        "added_over_model": round((peak - baseline["VmRSS"]) / model_bytes, 4),
        "fingerprint": model.fingerprint(),
    }


def measure(directory: Path, dtype: str, num_heads: int | None) -> dict:
    """Run :func:`child` in a fresh interpreter (nothing of this process counts)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, __file__, "--child", str(directory), "--dtype", dtype]
    if num_heads:
        cmd += ["--num-heads", str(num_heads)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"load of {directory} as {dtype} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--layout",
        choices=("16k", "tiny"),
        default="16k",
        help="16k: the real release's keys and shapes; tiny: the golden fixture's (quick mode)",
    )
    p.add_argument("--blocks", type=int, help="16k layout: keep only this many of the 40 trunk blocks")
    p.add_argument(
        "--loads",
        nargs="+",
        default=["official:bfloat16", "official:float32", "viq:bfloat16"],
        help="FORMAT:DTYPE loads to measure (formats official, viq; dtypes float32, bfloat16)",
    )
    p.add_argument("--workdir", help="where to write the weights (default: a new folder in /tmp, deleted after)")
    p.add_argument("--out", help="JSON record path (default: bench/results/load_memory-cpu-<time>.json)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    p.add_argument("--num-heads", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.dtype, args.num_heads)))
        return {}

    layout = layout_16k(blocks=args.blocks) if args.layout == "16k" else layout_of(FIXTURE)
    num_heads = None if args.layout == "16k" else 4  # the fixture's width (64) is not an official one
    work = Path(tempfile.mkdtemp(prefix="viq-load-memory-", dir=args.workdir))
    loads = [tuple(x.split(":")) for x in args.loads]
    results, timings = [], {}
    try:
        t = time.perf_counter()
        write_official(layout, work / "official")
        timings["write_official_s"] = round(time.perf_counter() - t, 1)
        if any(fmt == "viq" for fmt, _ in loads):
            t = time.perf_counter()
            write_viq(work / "official", work / "viq", num_heads)
            timings["write_viq_s"] = round(time.perf_counter() - t, 1)
        files = {str(f.relative_to(work)): f.stat().st_size for f in sorted(work.rglob("*")) if f.is_file()}
        for fmt, dtype in loads:
            r = measure(work / fmt, dtype, num_heads)
            r["format"] = fmt
            results.append(r)
            print(
                f"{fmt:>8} -> {dtype:<8}  model {_gb(r['model_bytes'])}  peak RSS {_gb(r['peak_rss'])} "
                f"({r['peak_over_model']:.3f}x; added {r['added_over_model']:.3f}x over a {_gb(r['baseline_rss'])} "
                f"baseline)  sampled peak anon {_gb(r['sampled_peak_rss_anon'])} file {_gb(r['sampled_peak_rss_file'])}"
                f"  {r['seconds']} s",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record = {
        "config": {
            "layout": args.layout,
            "blocks": args.blocks,
            "parameters": parameters(layout),
            "files_bytes": files,
            "loads": args.loads,
            **timings,
        },
        "measures": "VmHWM of a fresh process (reset after imports) = peak resident set incl. file-backed pages; "
        "baseline = VmRSS after importing torch and viq; model = parameters + buffers as loaded",
        "figures": results,
    }
    path = write_record("load_memory", torch.device("cpu"), record, args.out)
    print(f"record: {path}")
    return record


if __name__ == "__main__":
    main()
