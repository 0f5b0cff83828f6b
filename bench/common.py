"""Shared helpers for the benchmarks: device description, timing, and JSON result records."""

from __future__ import annotations

import json
import math
import platform
import random
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def command_line() -> str:
    """The command that ran this benchmark, as a user would type it (``python -m bench.<name> ...``)."""
    script = Path(sys.argv[0])
    if script.parent.resolve() == Path(__file__).resolve().parent:
        return " ".join(["python", "-m", f"bench.{script.stem}", *sys.argv[1:]])
    return " ".join(["python", *sys.argv])


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Best wall time of ``repeats`` calls after ``warmup`` calls (kernel selection, caches)."""
    for _ in range(warmup):
        fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def write_record(name: str, device: torch.device, record: dict[str, Any], out: str | None = None) -> Path:
    """Write a result record as JSON under bench/results/ (or ``out``), with device, date, command."""
    now = datetime.now(timezone.utc)
    full = {
        "benchmark": name,
        "date": now.isoformat(timespec="seconds"),
        "command": command_line(),
        "device": device_description(device),
        "torch": torch.__version__,
        **record,
    }
    path = Path(out) if out else RESULTS / f"{name}-{device.type}-{now:%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(full, indent=2) + "\n")
    return path


def mixed_sizes(n: int, lo: int, hi: int, seed: int) -> list[tuple[int, int]]:
    """Random (H, W): area drawn between lo^2 and hi^2, aspect ratio between 1:3 and 3:1."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        area = rng.uniform(lo * lo, hi * hi)
        aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
        h = max(16, min(2 * hi, round(math.sqrt(area / aspect))))
        w = max(16, min(2 * hi, round(math.sqrt(area * aspect))))
        out.append((h, w))
    return out
