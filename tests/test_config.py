"""Config dataclasses: JSON round trips, presets, validation."""

from __future__ import annotations

import math

import pytest

from viq.model.config import FSQ_LEVELS, PRESETS, HeadConfig, ViQConfig, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_json(name, tmp_path):
    cfg = get_preset(name)
    assert cfg.name == name
    cfg.save(tmp_path / "config.json")
    assert ViQConfig.load(tmp_path / "config.json") == cfg
    assert get_preset(name) is not get_preset(name)  # fresh copies, safe to mutate


def test_official_sizes():
    sizes = {"2k": 2304, "4k": 4096, "8k": 8192, "16k": 15360, "64k": 64000}
    for size, k in sizes.items():
        cfg = get_preset(f"viq-g-{size}")
        assert cfg.head.codebook_size == k == math.prod(FSQ_LEVELS[size])
        assert (cfg.encoder.width, cfg.encoder.depth, cfg.encoder.num_heads, cfg.encoder.pos_grid) == (
            1536,
            40,
            16,
            128,
        )
        assert (cfg.head.attn_dim, cfg.head.num_heads, cfg.head.codes_per_patch) == (256, 16, 4)
    so400m = get_preset("viq-so400m-16k")
    assert (so400m.encoder.width, so400m.encoder.depth, so400m.encoder.mlp_hidden) == (1152, 27, 4304)


def test_validation_errors():
    with pytest.raises(ValueError, match="unknown keys"):
        ViQConfig.from_dict({**get_preset("viq-test").to_dict(), "extra": 1})
    with pytest.raises(ValueError, match="levels"):
        HeadConfig(levels=(1, 8))
    with pytest.raises(ValueError, match="format_version"):
        ViQConfig.from_json('{"format_version": 9}')
    with pytest.raises(ValueError, match="divisible"):
        get_preset("viq-test").replace(encoder={**get_preset("viq-test").encoder.__dict__, "num_heads": 3})
    with pytest.raises(KeyError, match="unknown preset"):
        get_preset("viq-huge")


def test_old_tensorboard_flag_means_the_tensorboard_tracker():
    from viq.train.config import TrainConfig

    assert TrainConfig.from_dict({"stage": "stage1", "train": {"tensorboard": True}}).train.trackers == ["tensorboard"]
    assert TrainConfig.from_dict({"stage": "stage1", "train": {"tensorboard": False}}).train.trackers == []
    both = {"stage": "stage1", "train": {"tensorboard": True, "trackers": ["wandb"]}}
    assert TrainConfig.from_dict(both).train.trackers == ["wandb", "tensorboard"]
