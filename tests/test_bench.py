"""The benchmark scripts run (tiny settings; no timing is asserted -- figures live in docs/benchmarks.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.parametrize("script, argv", [
    ("encode_throughput", ["--num-images", "2", "--min-side", "32", "--max-side", "64", "--fixed-size", "32", "--repeats", "1"]),
    ("train_efficiency", ["--seq-len", "256", "--repeats", "1"]),
    ("extract_throughput", ["--num-images", "4", "--min-side", "32", "--max-side", "64", "--workers", "0"]),
    ("train_step", ["--samples", "2", "--min-side", "32", "--max-side", "48", "--prompt-len", "4", "8",
                    "--answer-len", "4", "8", "--max-length", "128", "--teacher-size", "32", "--repeats", "1"]),
])
def test_benchmark_runs(script, argv, tmp_path):
    module = __import__(script)
    record = module.main([*argv, "--out", str(tmp_path / "r.json")])
    assert (tmp_path / "r.json").is_file()
    assert record["figures"]
