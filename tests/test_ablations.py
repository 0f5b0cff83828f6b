"""bench/ablations.py (issue 11): variants parse and are checked before anything trains; the --smoke run
writes one record per run and a summary, shares the stages a variant does not change, and its overrides
reach the saved model configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import ablation_summary, ablation_variants, ablations


def test_variant_tokens():
    v = ablations.parse_variant("x", ["stage2_1,stage2_2:loss.recon=0", "optim.lr=5e-4", "skip=stage2_1"])
    assert v.chain() == ["stage1", "stage2_2", "drawer"]
    assert v.stage_overrides("stage2_2") == ["loss.recon=0", "optim.lr=5e-4"]
    assert v.stage_overrides("drawer") == ["optim.lr=5e-4"]
    assert ablations.parse_variant("r", ["until=stage1"]).chain() == ["stage1"]
    # a value may hold ':' (paths) without being taken for a stage
    assert ablations.parse_variant("p", ["model.init=viq:/a/b"]).stage_overrides("stage1") == ["model.init=viq:/a/b"]
    defaults = ablations.default_variants()
    assert {v.axis for v in defaults.values()} == {"control", *ablations.AXES}
    for variant in defaults.values():
        ablations.check_variant(variant)


@pytest.mark.parametrize(
    "tokens, message",
    [
        (["stage2_2:model.config.head.ropez=false"], "unknown key 'ropez' in model.config.head"),
        (["loss.recn=0"], "unknown key 'recn' in loss"),
        (["stage9:loss.recon=0"], "unknown stage"),
        (["stage2_2:model.config.head.bottleneck_limit=foo"], "bottleneck_limit must be"),
        (["until=stage1", "stage2_2:loss.recon=0"], "none of which it trains"),
        (["skip=stage1"], "cannot be skipped"),
        # the demo's 2-2 fits FSQ's input map from data; another quantizer must say how it starts
        (["stage2_2:model.config.head.quantizer=simvq"], "fsq_init: pca fits the projection into FSQ"),
    ],
)
def test_bad_variants_fail_early(tokens, message):
    with pytest.raises(ValueError, match=message):
        ablations.check_variant(ablations.parse_variant("bad", tokens))


def test_bad_variant_on_the_command_line(capsys):
    with pytest.raises(SystemExit):
        ablations.main(["--dry-run", "--variant", "bad", "stage2_2:model.config.head.ropez=false"])
    assert "unknown key 'ropez'" in capsys.readouterr().err


def test_drawer_flag_and_variants_without_a_stage_2_latent_loss():
    cheap = ablations.main(["--dry-run"])["variants"]
    full = ablations.main(["--dry-run", "--drawer"])["variants"]
    assert "until=stage2_2" in cheap["control"] and not any(t.startswith("until=") for t in full["control"])
    # no_recon's stage 2-2 trains no latent decoder: a drawer is trained on its codes either way.
    assert not any(t.startswith("until=") for t in cheap["no_recon"])
    assert "until=stage1" in cheap["continuous"]
    # SimVQ encodes and trains the drawer like FSQ (the quantizer protocol): with --drawer its chain is whole.
    assert not any(t.startswith("until=") for t in full["simvq_4k"])


def test_smoke(tmp_path):
    results = tmp_path / "results"
    summary = ablations.main(["--smoke", "--work", str(tmp_path / "work"), "--results", str(results)])
    records = {p.name: json.loads(p.read_text()) for p in results.glob("*-seed*.json")}
    assert set(records) == {"control-seed0.json", "no_rope-seed0.json"}
    for r in records.values():
        assert r["benchmark"] == "ablations" and r["smoke"] and r["seed"] == 0
        qa = r["qa"]
        assert qa["stage"] == "stage2_2" and qa["n"] > 0
        assert all(0 <= qa[k] <= 1 for k in ("real", "blank", "majority")) and "shuffled" not in qa
        assert all(lo <= hi for lo, hi in qa["ci95"].values()) and set(qa["ci95"]) >= {"real", "blank"}
        for kind in ("synthetic", "photos"):
            assert r["recon"][kind]["psnr"] > 0 and r["recon"][kind]["psnr_codec"] > 0
        assert 0 <= r["codes"]["entropy_bits"] <= r["codes"]["log2_codebook"]
        # Without --drawer, reconstruction is drawn by stage 2-2's own latent decoder.
        assert r["train_s"] > 0 and [s["stage"] for s in r["stages"]] == ["stage1", "stage2_1", "stage2_2"]
        assert r["recon_from"] == "stage2_2"
    control, no_rope = records["control-seed0.json"], records["no_rope-seed0.json"]
    # stage 1 and 2-1 are shared; 2-2 and the drawer are the variant's own
    assert [s["key"] for s in control["stages"][:2]] == [s["key"] for s in no_rope["stages"][:2]]
    assert all(s["reused"] for s in no_rope["stages"][:2])
    assert control["stages"][2]["key"] != no_rope["stages"][2]["key"]
    config_22 = lambda r: json.loads((Path(r["stages"][2]["dir"]) / "final" / "config.json").read_text())  # noqa: E731
    assert config_22(no_rope)["head"]["rope"] is False and config_22(control)["head"]["rope"] is True
    assert no_rope["model_config"]["head"]["rope"] is False  # the last stage's output
    saved = json.loads((results / "summary.json").read_text())
    assert saved["variants"] == json.loads(json.dumps(summary["variants"]))
    entry = saved["variants"]["no_rope"]
    assert entry["seeds"] == [0] and entry["axis"] == "position"
    for metric in (
        "qa_real",
        "qa_blank",
        "qa_real_minus_blank",
        "psnr_synthetic",
        "psnr_synthetic_codec",
        "entropy_bits",
        "train_s",
    ):
        assert entry["metrics"][metric]["n"] == 1 and entry["metrics"][metric]["ci95"] is None  # one seed: no interval
    assert "qa_real" in entry["vs_control"]


def test_t_interval():
    assert ablation_summary.t_interval([1.0])["ci95"] is None
    m = ablation_summary.t_interval([1.0, 2.0, 3.0])
    assert m["mean"] == 2.0 and m["ci95"][0] == pytest.approx(2.0 - 4.3026527 / 3**0.5, abs=1e-6)  # t(0.975, 2)


def test_verdicts_follow_the_paired_interval():
    ci = lambda lo, hi: {"mean": (lo + hi) / 2, "ci95": [lo, hi], "half_width": (hi - lo) / 2}  # noqa: E731
    assert ablation_summary.verdict(ci(-0.10, -0.02), "position") == "reproduced"  # the variant is worse
    assert ablation_summary.verdict(ci(0.01, 0.08), "position") == "reversed"
    assert ablation_summary.verdict(ci(-0.05, 0.03), "proximal") == "inconclusive"
    assert ablation_summary.verdict({"mean": -0.1, "ci95": None}, "recon") == "inconclusive (one seed)"
    assert ablation_summary.verdict(None, "recon") == "not measured"
    # Reference: the codes should stay within REFERENCE_MARGIN of the continuous encoder.
    assert ablation_summary.verdict(ci(-0.02, 0.03), "reference") == "reproduced"
    assert ablation_summary.verdict(ci(0.06, 0.12), "reference") == "reversed"
    assert ablation_summary.verdict(ci(-0.02, 0.09), "reference") == "inconclusive"


def test_report_rebuilds_the_summary_and_prints_the_table(tmp_path, capsys):
    def record(variant, axis, seed, real, psnr):
        return {
            "benchmark": "ablations",
            "variant": variant,
            "axis": axis,
            "description": "",
            "spec": [],
            "seed": seed,
            "qa": {"real": real, "blank": 0.2, "majority": 0.2, "real_minus_blank": real - 0.2},
            "recon": {"synthetic": {"psnr": psnr, "psnr_codec": 27.0}},
            "train_s": 10.0,
            "wall_s": {"train": 10.0, "eval": 2.0},
            "prepare_s": {"data": 1.0},
        }

    results = tmp_path / "r"
    results.mkdir()
    for seed, (c, v) in enumerate([(0.50, 0.40), (0.48, 0.41), (0.52, 0.43)]):
        for name, axis, acc in (("control", "control", c), ("no_rope", "position", v)):
            (results / f"{name}-seed{seed}.json").write_text(json.dumps(record(name, axis, seed, acc, 20.0 + seed)))
    summary = ablations.main(["--report", "--results", str(results)])
    entry = summary["variants"]["no_rope"]
    assert entry["verdict"]["qa_real"] == "reproduced" and entry["verdict"]["psnr_synthetic"] == "inconclusive"
    assert summary["wall_s_all_records"] == 6 * 12.0 + 3 * 1.0
    table = capsys.readouterr().out
    assert "| position | no_rope | 3 |" in table and "reproduced; inconclusive" in table and "65.3" in table
    with pytest.raises(SystemExit):
        ablations.main(["--report", "--results", str(tmp_path / "empty")])


def test_variant_step_counts_scale_like_the_demos(tmp_path):
    """A variant's own step counts are scaled by --scale (direct_fsq's 2-2 warm-up at a quarter of the
    demo's steps is a quarter as long); a variant that turns the warm-up off keeps it off."""
    direct = ablations.default_variants()["direct_fsq"].stage_overrides("stage2_2")
    quarter = ablations.run_overrides("stage2_2", direct, tmp_path, scale=0.25, seed=0)
    steps = [kv for kv in quarter if kv.startswith("model.head_warmup_steps=")]
    assert steps == [f"model.head_warmup_steps={round(ablation_variants.DIRECT_FSQ_WARMUP * 0.25)}"]
    off = ablations.run_overrides("stage2_1", ["model.head_warmup_steps=0"], tmp_path, scale=0.25, seed=0)
    assert [kv for kv in off if kv.startswith("model.head_warmup_steps=")] == ["model.head_warmup_steps=0"]
    assert sum(kv.startswith("train.max_steps=") for kv in off) == 1
