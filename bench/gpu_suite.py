"""The GPU suite (issue 12): the paper's speed promises and bf16 batch invariance, in one prepared run.

    PYTHONPATH=src python -m bench.gpu_suite [--smoke] [--device cuda] [--out bench/results] [--budget-s 480]

Five parts, each guarded by its own share of ``--budget-s`` and each writing one JSON record
(``write_record``: device, torch version, date, command, figures) under ``--out``:

a. ``encode``: packed vs padded encoding of a mixed-size set (and packed trunk vs a dense ViT on
   equal fixed-size work; vs timm's ``VisionTransformer`` of the same shape when timm is installed),
   via ``bench/encode_throughput.py``. viq-g-16k, bf16, random weights.
b. ``invariance``: codes of each image encoded alone vs packed together vs packed in reversed order;
   the share of images whose codes are identical, for each available attention backend, in the
   default mode and in the batch-invariant mode (``encode_stream(batch_invariant=True)``), with the
   time of a packed encode in each mode (the invariant mode's cost).
c. ``train``: MLLM step, online encoder vs stored codes (``bench/train_efficiency.py``), Qwen2.5-0.5B
   and 7B shapes at 4K and 16K tokens: forward and forward+backward+AdamW, reductions beside the paper's.
d. ``extract``: JPEG/PNG folder -> ``viq.extract.extract`` with DataLoader workers
   (``bench/extract_throughput.py``): images/s, model busy share, GPU utilisation when readable.
e. ``peer``: viq's trunk vs transformers' ``Siglip2VisionModel`` (NaFlex) on the same SigLIP2-giant-opt
   weights and mixed-size images (``bench/peer_siglip2.py``): feature agreement and images/s.

``--smoke`` runs every part on CPU with tiny shapes (float32) in well under a minute and writes to a
temporary folder unless ``--out`` is given. Exit status 0 when every part ran or recorded why it was
skipped; 1 when a part raised.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import torch

from bench import encode_throughput, extract_throughput, peer_siglip2, train_efficiency
from bench.common import RESULTS, best_time, mixed_sizes, write_record
from viq.formats.image import padded_grid
from viq.model.attention import available_backends
from viq.model.config import get_preset
from viq.model.viq import ViQModel

#: The paper's time reductions (%), 4K / 16K tokens.
PAPER = {
    "forward": {"0.5b": (71, 79), "1.5b": (69, 77), "3b": (62, 73), "7b": (47, 65)},
    "step": {"0.5b": (50, 70), "1.5b": (46, 63), "3b": (36, 54), "7b": (23, 42)},
}
#: Share of --budget-s given to each part.
SHARES = {"encode": 0.22, "invariance": 0.13, "train": 0.35, "extract": 0.17, "peer": 0.13}


class _OutOfTime(Exception):
    pass


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def settings(smoke: bool, device: torch.device) -> dict:
    if smoke:
        return {
            "preset": "viq-test",
            "dtype": "float32",
            "encode": [
                "--num-images",
                "4",
                "--min-side",
                "32",
                "--max-side",
                "64",
                "--fixed-size",
                "32",
                "--batch-tokens",
                "1024",
                "--repeats",
                "1",
            ],
            "timm_fixed": (2, 32),
            "inv_images": 8,
            "inv_sides": (32, 80),
            "train": {"llm": ["tiny"], "seq_lens": [256], "shape": "cpu", "image_size": 64},
            "extract": [
                "--num-images",
                "16",
                "--min-side",
                "32",
                "--max-side",
                "96",
                "--workers",
                "2",
                "--batch-tokens",
                "2048",
                "--inputs",
                "folder",
            ],
            "peer": [
                "--width",
                "64",
                "--heads",
                "4",
                "--mlp",
                "128",
                "--layers",
                "2",
                "--images",
                "4",
                "--repeats",
                "1",
            ],
        }
    return {
        "preset": "viq-g-16k",
        "dtype": "bfloat16",
        "encode": [
            "--num-images",
            "64",
            "--min-side",
            "224",
            "--max-side",
            "1024",
            "--fixed-size",
            "512",
            "--batch-tokens",
            "32768",
            "--repeats",
            "2",
        ],
        "timm_fixed": (32, 512),
        "inv_images": 32,
        "inv_sides": (224, 768),
        "train": {"llm": ["0.5b", "7b"], "seq_lens": [4096, 16384], "shape": "gpu", "image_size": 448},
        "extract": [
            "--num-images",
            "512",
            "--min-side",
            "224",
            "--max-side",
            "1024",
            "--workers",
            "4",
            "8",
            "--batch-tokens",
            "32768",
            "--inputs",
            "folder",
        ],
        "peer": ["--layers", "40", "--images", "32", "--repeats", "3", "--dtype", "bfloat16"],
    }


# ---------------------------------------------------------------------------------------------- a
def timm_dense(config, device: torch.device, dtype: torch.dtype, n: int, side: int, repeats: int) -> dict:
    """timm's VisionTransformer of the trunk's shape on a fixed-size batch (random weights)."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as e:
        return {"skipped": f"timm not installed ({e})"}
    enc = config.encoder
    vit = (
        VisionTransformer(
            img_size=side,
            patch_size=enc.patch_size,
            embed_dim=enc.width,
            depth=enc.depth,
            num_heads=enc.num_heads,
            mlp_ratio=enc.mlp_hidden / enc.width,
            num_classes=0,
            global_pool="",
            class_token=False,
        )
        .to(device, dtype)
        .eval()
    )
    batch = torch.rand(n, 3, side, side, device=device, dtype=dtype)

    def run():
        with torch.inference_mode():
            vit.forward_features(batch)

    seconds = best_time(run, device, repeats)
    tokens = n * (side // enc.patch_size) ** 2
    return {"seconds": seconds, "images_per_s": n / seconds, "tokens_per_s": tokens / seconds}


def _bench_argv(s: dict, part: str, device: torch.device, tmp: Path) -> list[str]:
    """The command line of the throughput benchmark behind ``part`` (``encode`` / ``extract``) for setting
    ``s``: its preset, device and dtype, the setting's own flags, and a JSON output under ``tmp``."""
    return [
        "--preset",
        s["preset"],
        "--device",
        str(device),
        "--dtype",
        s["dtype"],
        *s[part],
        "--out",
        str(tmp / f"{part}.json"),
    ]


def part_encode(args, s: dict, device: torch.device, budget: Budget, tmp: Path) -> dict:
    argv = _bench_argv(s, "encode", device, tmp)
    r = encode_throughput.main(argv)
    figures, ratios = r["figures"], dict(r["ratios"])
    skipped = {}
    if budget.left() > 0:
        n, side = s["timm_fixed"]
        try:
            t = timm_dense(get_preset(s["preset"]), device, getattr(torch, s["dtype"]), n, side, 2)
        except Exception as e:  # timm version differences: record, do not fail the suite
            t = {"skipped": f"timm run failed: {type(e).__name__}: {e}"}
        if "skipped" in t:
            skipped["timm_vit"] = t["skipped"]
        else:
            figures["timm_vit"] = t
            # same batch shape as encode_throughput's fixed batch only when n/side match its args
            ratios["note_timm"] = f"timm batch {n} x {side}^2"
    else:
        skipped["timm_vit"] = "skipped: time budget"
    ratios["targets"] = {"packed_vs_padded": ">= 1.5", "packed_trunk_vs_dense_vit": ">= 0.9"}
    summary = (
        f"packed/padded {ratios['packed_vs_padded_images_per_s']:.2f}x, "
        f"trunk/dense {ratios['packed_trunk_vs_dense_vit_fixed']:.2f}x, "
        f"packed {figures['packed']['tokens_per_s']:.0f} tok/s"
    )
    return {
        "args": r["args"],
        "image_sizes": r["image_sizes"],
        "figures": figures,
        "ratios": ratios,
        "skipped": skipped,
        "summary": summary,
    }


# ---------------------------------------------------------------------------------------------- b
def part_invariance(args, s: dict, device: torch.device, budget: Budget, tmp: Path) -> dict:
    dtype = getattr(torch, s["dtype"])
    config = get_preset(s["preset"])
    model = ViQModel.from_config(config, seed=0, components=["encoder"]).to(device, dtype)
    lo, hi = s["inv_sides"]
    sizes = mixed_sizes(s["inv_images"], lo, hi, seed=1)
    g = torch.Generator().manual_seed(1)
    images = [(torch.rand(3, h, w, generator=g) * 2 - 1).to(device, dtype) for h, w in sizes]
    p = config.encoder.patch_size
    all_tokens = sum(math.prod(padded_grid(h, w, p)) for h, w in sizes)
    figures, skipped = {}, {}
    for backend in available_backends(device):
        for mode, invariant in (("default", False), ("batch_invariant", True)):
            key = f"{backend}/{mode}"
            if budget.left() <= 0:
                skipped[key] = "skipped: time budget"
                continue
            try:
                figures[key] = _invariance_run(model, images, backend, invariant, all_tokens, device)
            except torch.OutOfMemoryError:
                skipped[key] = "skipped: out of memory"
                torch.cuda.empty_cache()
            except Exception as e:  # a backend that cannot run here (e.g. flex without a compiler)
                skipped[key] = f"skipped: {type(e).__name__}: {str(e)[:200]}"
    summary = ", ".join(
        f"{k}: {100 * f['identical_all_three']:.0f}% identical, packed encode {f['packed_seconds']:.3f} s"
        for k, f in figures.items()
    )
    return {
        "dtype": s["dtype"],
        "preset": s["preset"],
        "image_sizes": sizes,
        "figures": figures,
        "skipped": skipped,
        "summary": summary or "no backend ran",
    }


def _invariance_run(model, images, backend: str, invariant: bool, all_tokens: int, device) -> dict:
    """Codes alone vs packed vs reversed for one backend and mode, and the packed encode's time
    (packs of a quarter of the set's tokens, so the batch-invariant mode's filler cost shows)."""
    model.set_attention_backend(backend)

    def encode(batch, batch_tokens):
        return [c.indices for c in model.encode_pixels(batch, batch_tokens=batch_tokens, batch_invariant=invariant)]

    t = time.perf_counter()
    alone = [encode([x], all_tokens)[0] for x in images]
    packed = encode(images, all_tokens)
    rev = encode(images[::-1], all_tokens)[::-1]
    seconds = time.perf_counter() - t
    quarter = max(1, all_tokens // 4)
    encode(images, quarter)  # warm-up of the timed shape
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    encode(images, quarter)
    if device.type == "cuda":
        torch.cuda.synchronize()
    packed_seconds = time.perf_counter() - t
    n = len(images)
    return {
        "images": n,
        "tokens": all_tokens,
        "batch_invariant": invariant,
        "identical_alone_vs_packed": sum(torch.equal(a, b) for a, b in zip(alone, packed)) / n,
        "identical_alone_vs_reversed": sum(torch.equal(a, b) for a, b in zip(alone, rev)) / n,
        "identical_all_three": sum(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(alone, packed, rev)) / n,
        "differing_codes_alone_vs_packed": sum(int((a != b).sum()) for a, b in zip(alone, packed)),
        "total_codes": sum(a.numel() for a in alone),
        "seconds": seconds,
        "packed_seconds": packed_seconds,
        "packed_batch_tokens": quarter,
    }


# ---------------------------------------------------------------------------------------------- c
def part_train(args, s: dict, device: torch.device, budget: Budget, tmp: Path) -> dict:
    t = s["train"]
    gpu = device.type == "cuda"
    ns = SimpleNamespace(
        shape=t["shape"],
        image_size=t["image_size"],
        text_min=64,
        text_max=512,
        dtype="bfloat16" if gpu else "float32",
        gradient_checkpointing=False,
        repeats=2,
        seq_len=None,
    )
    if t["shape"] == "cpu":
        ns.text_min, ns.text_max, ns.repeats = 32, 128, 1
    figures, skipped = {}, {}
    for llm in t["llm"]:
        for seq_len in t["seq_lens"]:
            key = f"{llm}@{seq_len}"
            if budget.left() <= 0:
                skipped[key] = "skipped: time budget"
                continue
            start = time.perf_counter()
            try:
                r = train_efficiency.measure(ns, llm, seq_len, device)
            except torch.OutOfMemoryError:
                skipped[key] = "skipped: out of memory"
                if gpu:
                    torch.cuda.empty_cache()
                continue
            r["seconds_total"] = time.perf_counter() - start
            on, off = r["online"], r["offline"]
            if "error" in on or "error" in off:
                # the forward may have been measured before the step ran out of memory
                if "forward_s" in on and "forward_s" in off:
                    r["forward_reduction_pct"] = 100 * (1 - off["forward_s"] / on["forward_s"])
                skipped[key] = (
                    "step skipped: out of memory" if "forward_reduction_pct" in r else "skipped: out of memory"
                )
                r["measured"] = "forward only" if "forward_reduction_pct" in r else "nothing"
            else:
                r["measured"] = "forward; forward+backward+AdamW step"
            if llm in PAPER["forward"]:
                i = {4096: 0, 16384: 1}.get(seq_len)
                if i is not None:
                    r["paper_forward_reduction_pct"] = PAPER["forward"][llm][i]
                    r["paper_step_reduction_pct"] = PAPER["step"][llm][i]
            figures[key] = r
            if gpu:
                torch.cuda.empty_cache()
    parts = []
    for k, r in figures.items():
        fw, st = r.get("forward_reduction_pct"), r.get("step_reduction_pct")
        parts.append(f"{k} fwd {'-' if fw is None else f'{fw:.0f}%'} step {'-' if st is None else f'{st:.0f}%'}")
    return {
        "args": vars(ns),
        "paper_reduction_pct": PAPER,
        "figures": figures,
        "skipped": skipped,
        "summary": "; ".join(parts) or "no point ran",
    }


# ---------------------------------------------------------------------------------------------- d
class UtilSampler:
    """Samples torch.cuda.utilization() in a thread while extraction runs."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.samples, self.reason = device, [], None
        self._stop = threading.Event()
        self._thread = None
        if device.type != "cuda":
            self.reason = "not a CUDA device"
            return
        try:
            torch.cuda.utilization(device)
        except Exception as e:  # pynvml / amdsmi missing
            self.reason = f"torch.cuda.utilization unavailable: {type(e).__name__}: {e}"
            return
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.samples.append(torch.cuda.utilization(self.device))
            except Exception as e:
                self.reason = f"sampling failed: {e}"
                return

    def __enter__(self):
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()

    def result(self) -> dict:
        if not self.samples:
            return {"gpu_busy_share": None, "reason": self.reason or "no samples"}
        return {"gpu_busy_share": sum(self.samples) / len(self.samples) / 100, "samples": len(self.samples)}


def part_extract(args, s: dict, device: torch.device, budget: Budget, tmp: Path) -> dict:
    argv = _bench_argv(s, "extract", device, tmp)
    with UtilSampler(device) as sampler:
        r = extract_throughput.main(argv)
    figures = r["figures"]
    util = sampler.result()
    best = max(figures.values(), key=lambda f: f["images_per_s"])
    summary = f"{best['images_per_s']:.1f} img/s, model busy {100 * best['model_busy_share']:.0f}%, GPU util " + (
        "n/a" if util["gpu_busy_share"] is None else f"{100 * util['gpu_busy_share']:.0f}%"
    )
    return {
        "args": r["args"],
        "figures": figures,
        "gpu_utilization": util,
        "target": "model/GPU busy >= 90 %",
        "skipped": {},
        "summary": summary,
    }


def part_peer(args, s: dict, device: torch.device, budget: Budget, tmp: Path) -> dict:
    r = peer_siglip2.run(peer_siglip2.parse_args(["--device", str(device), *s["peer"]]))
    a = r["agreement"]
    summary = (
        f"viq {r['viq']['images_per_s']:.1f} img/s vs transformers {r['transformers']['images_per_s']:.1f} "
        f"({r['speedup']:.2f}x); features agree to {a['features_relative']:.1e}"
    )
    return {
        "figures": r,
        "target": "features agree (relative 1e-5 in float32); viq >= transformers",
        "skipped": {},
        "summary": summary,
    }


PARTS = {
    "a": ("encode", part_encode),
    "b": ("invariance", part_invariance),
    "c": ("train", part_train),
    "d": ("extract", part_extract),
    "e": ("peer", part_peer),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, float32, temporary output folder")
    ap.add_argument("--device", default=None, help="default: cuda when available (cpu with --smoke)")
    ap.add_argument("--out", default=None, help="records folder (default bench/results; a temp folder with --smoke)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="total time budget, split across parts")
    ap.add_argument("--parts", default="abcde", help="subset of parts to run, e.g. 'ad'")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="viq-gpu-suite-")) if args.smoke else RESULTS)
    s = settings(args.smoke, device)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    t0 = time.perf_counter()
    rows, failed = [], False
    with tempfile.TemporaryDirectory(prefix="viq-gpu-suite-scratch-") as scratch:
        for letter, (name, fn) in PARTS.items():
            if letter not in args.parts:
                continue
            budget = Budget(args.budget_s * SHARES[name])
            record = {"part": letter, "smoke": args.smoke, "budget_s": budget.seconds}
            left_total = args.budget_s - (time.perf_counter() - t0)
            budget.seconds = min(budget.seconds, left_total)
            try:
                if budget.left() <= 0:
                    raise _OutOfTime
                record.update(fn(args, s, device, budget, Path(scratch)))
                status = "ran" if record.get("figures") else "skipped"
                if status == "skipped" and not record.get("skipped"):
                    record["skipped"] = {"all": "nothing measured"}
            except _OutOfTime:
                status, record["skipped"] = "skipped", {"all": "skipped: time budget"}
                record["summary"] = "time budget spent"
            except torch.OutOfMemoryError:
                status, record["skipped"] = "skipped", {"all": "skipped: out of memory"}
                record["summary"] = "out of memory"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            except Exception as e:
                failed, status = True, "error"
                record["error"] = f"{type(e).__name__}: {e}"
                record["traceback"] = traceback.format_exc()
                record["summary"] = record["error"][:120]
                print(record["traceback"], file=sys.stderr)
            record["status"], record["seconds"] = status, budget.elapsed()
            if budget.left() < 0:
                record["over_budget_s"] = -budget.left()
            path = write_record(
                f"gpu_suite-{name}", device, record, str(out / f"gpu_suite-{letter}-{name}-{device.type}-{stamp}.json")
            )
            rows.append((letter, name, status, record["seconds"], record.get("summary", ""), path))
    total = time.perf_counter() - t0
    print(f"\nGPU suite on {device} ({'smoke' if args.smoke else 'full'}), {total:.1f} s; records in {out}")
    print(f"{'part':4s} {'name':10s} {'status':7s} {'time':>7s}  summary")
    for letter, name, status, seconds, summary, _ in rows:
        print(f"{letter:4s} {name:10s} {status:7s} {seconds:6.1f}s  {summary}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
