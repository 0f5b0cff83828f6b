"""Encoder initialisation from SigLIP checkpoints: Hugging Face directories and timm/open_clip state dicts."""

from __future__ import annotations

import pytest
import torch

from viq.model.config import EncoderConfig
from viq.model.encoder import ViTEncoder
from viq.train.init import load_siglip, resize_pos_table


def _encoder_from(config, state):
    enc = ViTEncoder(config.encoder)
    own = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    missing, unexpected = enc.load_state_dict(own, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return enc.eval()


def test_hf_siglip_matches_transformers(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    hf_cfg = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16
    )
    hf = SiglipVisionModel(hf_cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped weight would show
        for _name, p in hf.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "siglip")
    c = load_siglip("hf-siglip", str(tmp_path / "siglip"), {})
    config, state = c.config, c.state
    assert (config.encoder.width, config.encoder.depth, config.encoder.num_heads, config.encoder.pos_grid) == (
        32,
        2,
        2,
        4,
    )
    assert config.encoder.mlp_act == "gelu_tanh"
    enc = _encoder_from(config, state)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        ref = hf(pixel_values=pixels)
        tokens, packed = enc(list(pixels))
        ours = packed.split(enc.pool.norm_in(tokens))
        pooled = enc.pool(packed.split(tokens))
    for i in range(2):
        torch.testing.assert_close(ours[i], ref.last_hidden_state[i], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ref.pooler_output, atol=1e-5, rtol=1e-5)


def test_timm_open_clip_layout(tmp_path):
    torch.manual_seed(0)
    cfg = EncoderConfig(width=32, depth=2, num_heads=2, mlp_hidden=64, pos_grid=4)
    source = ViTEncoder(cfg)
    timm_state = {}
    for k, v in source.state_dict().items():
        if k.startswith("pool.norm_in."):
            k = "norm." + k[len("pool.norm_in.") :]
        elif k.startswith("pool."):
            k = "attn_pool." + k[len("pool.") :]
        timm_state["visual.trunk." + k] = v
    timm_state["visual.trunk.head.weight"] = torch.zeros(3, 32)  # a classifier head is ignored
    timm_state["text.token_embedding.weight"] = torch.zeros(5, 32)  # so is open_clip's text tower
    torch.save(timm_state, tmp_path / "open_clip_pytorch_model.bin")
    c = load_siglip("timm-siglip", str(tmp_path / "open_clip_pytorch_model.bin"), {"encoder": {"num_heads": 2}})
    config, state = c.config, c.state
    enc = _encoder_from(config, state)
    for (k, a), (k2, b) in zip(source.state_dict().items(), enc.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # Resizing the position table to a larger grid, as the official converter does (24x24 -> 128x128).
    c = load_siglip(
        "timm-siglip", str(tmp_path / "open_clip_pytorch_model.bin"), {"encoder": {"num_heads": 2, "pos_grid": 8}}
    )
    assert c.state["encoder.pos_embed"].shape == (1, 64, 32)
    assert c.config.encoder.pos_grid == 8
    # ... while the checkpoint as published (the teacher) keeps its own table, unresized.
    native_config, native_state = c.native_encoder()
    assert native_config.pos_grid == 4 and native_config.num_heads == 2
    assert torch.equal(native_state["encoder.pos_embed"], timm_state["visual.trunk.pos_embed"])


def test_resize_pos_table_identity_and_errors():
    t = torch.randn(1, 16, 8)
    assert resize_pos_table(t, 4) is t
    assert resize_pos_table(t, 6).shape == (1, 36, 8)
    with pytest.raises(ValueError, match="square"):
        resize_pos_table(torch.randn(1, 15, 8), 4)


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_siglip("hf-siglip", str(tmp_path), {})
    torch.save({"foo": torch.zeros(1)}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="not a timm"):
        load_siglip("timm-siglip", str(tmp_path / "x.pth"), {})


def test_hf_siglip2_matches_transformers(tmp_path):
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    torch.manual_seed(0)
    hf_cfg = Siglip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_patches=16, patch_size=16
    )
    hf = Siglip2VisionModel(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "siglip2")
    c = load_siglip("hf-siglip", str(tmp_path / "siglip2"), {})
    config, state = c.config, c.state
    enc = _encoder_from(config, state)
    image = torch.rand(3, 64, 64) * 2 - 1
    # Siglip2 takes patches flattened as (py, px, channel), row-major over the 4x4 grid.
    patches = image.view(3, 4, 16, 4, 16).permute(1, 3, 2, 4, 0).reshape(1, 16, 16 * 16 * 3)
    with torch.no_grad():
        ref = hf(
            pixel_values=patches,
            pixel_attention_mask=torch.ones(1, 16, dtype=torch.long),
            spatial_shapes=torch.tensor([[4, 4]]),
        )
        tokens, packed = enc([image])
    torch.testing.assert_close(enc.pool.norm_in(tokens)[:16], ref.last_hidden_state[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(enc.pool(packed.split(tokens)), ref.pooler_output, atol=1e-5, rtol=1e-5)


def test_timm_siglip_file_on_the_hub(tmp_path, monkeypatch):
    """``timm-siglip:owner/name/<file>``: that one file of a Hub repository, from the Hugging Face cache
    (offline here); a local file is used as it is; a file that is not cached is one error naming the
    repository and the download command."""
    from viq.demo.public_checkpoints import VisionWidths, hub_cache_entry, open_clip_siglip
    from viq.model.hub import HubNotCachedError
    from viq.train.init import timm_siglip_file

    widths = VisionWidths(hidden=32, heads=2, mlp=64, layers=1)
    local = open_clip_siglip(tmp_path / "dl", widths, image_size=64)
    cache = tmp_path / "cache"
    hub_cache_entry(cache, "timm/ViT-tiny-SigLIP2", local.parent)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert timm_siglip_file(str(local)) == local
    found = timm_siglip_file("timm/ViT-tiny-SigLIP2/open_clip_pytorch_model.bin")
    assert found.is_file() and found.read_bytes() == local.read_bytes() and str(cache) in str(found)
    from_hub = load_siglip("timm-siglip", "timm/ViT-tiny-SigLIP2/open_clip_pytorch_model.bin", {})
    from_file = load_siglip("timm-siglip", str(local), {})
    assert from_hub.state.keys() == from_file.state.keys()
    assert all(torch.equal(from_hub.state[k], from_file.state[k]) for k in from_file.state)
    with pytest.raises(HubNotCachedError, match="timm/ViT-other.*hf download"):
        load_siglip("timm-siglip", "timm/ViT-other/open_clip_pytorch_model.bin", {})
