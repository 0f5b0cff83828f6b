"""viq demo end to end at a tiny scale: every stage runs, the report is written."""

from __future__ import annotations

import json

import viq
from viq.demo.run import run_demo


def test_demo_end_to_end(tmp_path):
    report = run_demo(tmp_path / "demo", scale=0.02, seed=1)
    assert report.is_file()
    text = report.read_text()
    for section in ("Training stages", "Loss curves", "input | reconstruction", "Held-out questions"):
        assert section in text
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(results["stages"]) == {"stage1", "stage2_1", "stage2_2", "drawer"}
    assert any(r["kind"] == "photo" for r in results["reconstructions"])
    assert all(r["psnr"] > 0 for r in results["reconstructions"])
    assert "answer_accuracy" in results["qa"]
    model = viq.load(tmp_path / "demo" / "runs" / "drawer" / "final")
    assert {"encoder", "embedder", "drawer", "vae"} <= set(model.components)
    # Re-running skips finished steps and gives the same report inputs.
    assert run_demo(tmp_path / "demo", scale=0.02, seed=1) == report
