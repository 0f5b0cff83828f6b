"""bench/gpu_suite.py --smoke runs end to end on CPU (issue 12: the GPU suite cannot rot)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_suite", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for letter, name in [("a", "encode"), ("b", "invariance"), ("c", "train"), ("d", "extract"), ("e", "peer")]:
        paths = list(tmp_path.glob(f"gpu_suite-{letter}-{name}-*.json"))
        assert len(paths) == 1, (letter, paths)
        record = json.loads(paths[0].read_text())
        for key in ("device", "torch", "date", "command"):
            assert record[key], key
        # With the whole budget on a CPU every part runs: a suite whose parts all skip must fail here.
        assert record["status"] == "ran" and record["figures"], record
    assert "part name" in proc.stdout
    invariance = json.loads(next(tmp_path.glob("gpu_suite-b-invariance-*.json")).read_text())["figures"]
    invariant = [f for f in invariance.values() if isinstance(f, dict) and f.get("batch_invariant")]
    assert invariant and all(
        f["identical_all_three"] == 1.0 and f["differing_codes_alone_vs_packed"] == 0 for f in invariant
    )  # the batch-invariant mode's promise
    extract = json.loads(next(tmp_path.glob("gpu_suite-d-extract-*.json")).read_text())["figures"]
    assert all(f["encoded"] == f["images"] > 0 and f["failed"] == 0 for f in extract.values())
    peer = json.loads(next(tmp_path.glob("gpu_suite-e-peer-*.json")).read_text())
    assert peer["status"] == "ran" and peer["figures"]["agreement"]["features_relative"] < 1e-4


def test_gpu_suite_smoke_default_out_is_temporary():
    """Without --out, smoke records go to a temp folder, never bench/results (budget 0: parts skip)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    before = set((ROOT / "bench" / "results").iterdir())
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_suite", "--smoke", "--budget-s", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set((ROOT / "bench" / "results").iterdir()) == before
    folder = Path(proc.stdout.split("records in ", 1)[1].splitlines()[0].strip())
    records = sorted(folder.glob("gpu_suite-*.json"))
    assert len(records) == 5
    assert all(json.loads(p.read_text())["skipped"] == {"all": "skipped: time budget"} for p in records)
    shutil.rmtree(folder)
