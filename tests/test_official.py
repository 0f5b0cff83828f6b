"""Golden compatibility with the authors' code: official weights in, official outputs out.

The fixture (shared/fixtures/official-viq) holds tiny random-weight checkpoints in the official file
format, the exact pixel tensors passed to the official ``forward_indices`` and what the official code
returned. Indices must match exactly; features and latents to 1e-4 (float32, TF32 off).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import viq
from viq.model.encoder import pad_to_patches, resize_pos_embed
from viq.model.official import detect_config, load_official_state_dicts

N_IMAGES = 5
ATOL = 1e-4


@pytest.fixture(scope="module")
def fixture(official_dir):
    return {
        "inputs": load_file(official_dir / "inputs.safetensors"),
        "expected": load_file(official_dir / "expected.safetensors"),
        "intermediates": load_file(official_dir / "intermediates.safetensors"),
    }


@pytest.fixture(scope="module")
def official_model(official_dir):
    return viq.load(official_dir, num_heads=4)


def pixels(fixture):
    return [fixture["inputs"][f"pixel_values_{i}"] for i in range(N_IMAGES)]


def test_detected_config_is_the_fixture_config(official_model):
    expected = viq.get_preset("viq-tiny")
    assert official_model.config.to_dict() | {"name": ""} == expected.to_dict() | {"name": ""}
    assert set(official_model.components) == {"encoder", "dequant", "recon", "embedder", "drawer", "vae"}


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "one-by-one"])
def test_indices_exact(official_model, fixture, packed):
    px = pixels(fixture)
    codes = official_model.encode_pixels(px) if packed else [official_model.encode_pixels([p])[0] for p in px]
    sizes = fixture["expected"]["image_sizes"].tolist()
    for i, c in enumerate(codes):
        assert list(c.grid) == sizes[i]
        assert c.image_size == tuple(px[i].shape[-2:])
        assert torch.equal(c.flat(), fixture["expected"][f"indices_{i}"].flatten()), f"image {i}"


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "one-by-one"])
def test_embedder_drawer_and_vae(official_model, fixture, packed):
    exp = fixture["expected"]
    codes = official_model.encode_pixels(pixels(fixture))
    if packed:
        feats, latents = official_model.embed(codes), official_model.draw(codes)
    else:
        feats = [official_model.embed([c])[0] for c in codes]
        latents = [official_model.draw([c])[0] for c in codes]
    with torch.no_grad():
        drawer_feats, _ = official_model.drawer([c.flat() for c in codes], [c.grid for c in codes])
    for i in range(N_IMAGES):
        torch.testing.assert_close(feats[i], exp[f"embed_feats_{i}"][0], atol=ATOL, rtol=0)
        torch.testing.assert_close(drawer_feats[i], exp[f"drawer_feats_{i}"][0], atol=ATOL, rtol=0)
        torch.testing.assert_close(latents[i], exp[f"vae_latent_{i}"][0], atol=ATOL, rtol=0)


def test_vae_decode_float32(official_model, fixture):
    exp = fixture["expected"]
    for i in range(N_IMAGES):
        decoded = official_model.decode_latents([exp[f"vae_latent_{i}"][0]])[0]
        torch.testing.assert_close(decoded, exp[f"vae_decode_fp32_{i}"][0], atol=ATOL, rtol=0)


def test_reconstruct_matches_official_pixels_loosely(official_model, fixture):
    # The official uint8 recon ran the VAE in bf16 with an RMS norm that normalises in bf16 (diffusers
    # upcasts) and truncates to uint8: only a loose comparison is meaningful (fixture README).
    exp = fixture["expected"]
    codes = official_model.encode_pixels(pixels(fixture))
    for i, image in enumerate(official_model.reconstruct(codes, crop=False)):
        ours = torch.tensor(np.asarray(image)).float()
        official = exp[f"recon_uint8_{i}"].float()
        assert ours.shape == official.shape
        assert (ours - official).abs().mean() < 4.0
        # And our float32 decode, rounded, agrees with the fp32 reference to one level everywhere.
        ref = ((exp[f"vae_decode_fp32_{i}"][0] * 0.5 + 0.5).clamp(0, 1) * 255).permute(1, 2, 0)
        assert (ours - ref).abs().max() <= 0.5 + 1e-3


def test_reconstruct_crops_to_image_size(official_model, fixture):
    codes = official_model.encode_pixels(pixels(fixture))
    for c, image in zip(codes, official_model.reconstruct(codes)):
        assert (image.height, image.width) == c.image_size


def test_encoder_continuous_path_and_pool(official_model, fixture):
    exp = fixture["expected"]
    m = official_model
    with torch.no_grad():
        tokens, packed = m.encoder([pad_to_patches(p[0], 16) for p in pixels(fixture)])
        values = m.head(tokens, packed).values
        feats = packed.split(m.dequant.from_code_values(values))
        pooled = m.encoder.pool(feats)
    for i in range(N_IMAGES):
        torch.testing.assert_close(feats[i], exp[f"encoder_forward_feats_{i}"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(pooled, exp["attn_pool_tokens"], atol=ATOL, rtol=0)


def test_intermediates(official_model, fixture):
    """Position-table resize and RoPE angles match the official ones bit for bit; the FSQ input and
    bounded values to float32 noise (GEMM blocking differs), far below every rounding margin."""
    inter = fixture["intermediates"]
    m = official_model
    for i, p in enumerate(pixels(fixture)):
        x = pad_to_patches(p[0], 16)
        grid = (x.shape[1] // 16, x.shape[2] // 16)
        assert torch.equal(resize_pos_embed(m.encoder.pos_embed, grid), inter[f"pos_embed_resized_{i}"][0])
        assert torch.equal(m.head.rope.angles(grid), inter[f"rope_theta_{i}"][0])
        with torch.no_grad():
            tokens, packed = m.encoder([x])
            z = packed.split(m.head.pre_quantize(tokens, packed), 4)[0]  # drop any filler rows
        torch.testing.assert_close(z[None], inter[f"fsq_project_in_out_{i}"], atol=ATOL, rtol=0)
        bounded = m.head.fsq.bound(z)
        margin = inter[f"fsq_round_margin_{i}"][0, :, 0]
        # Bounded values agree to float noise; their rounding is what the exact-indices test checks.
        torch.testing.assert_close(bounded, inter[f"fsq_bounded_{i}"][0, :, 0], atol=ATOL, rtol=0)
        assert float(margin.min()) > 1e-4


def test_viq_format_round_trip_matches_official(official_model, official_dir, fixture, tmp_path):
    official_model.save_pretrained(tmp_path / "converted")
    reloaded = viq.load(tmp_path / "converted")
    assert reloaded.config == official_model.config
    for (k, a), (k2, b) in zip(official_model.state_dict().items(), reloaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    px = pixels(fixture)
    a, b = official_model.encode_pixels(px), reloaded.encode_pixels(px)
    assert all(x.same_codes(y) for x, y in zip(a, b))
    for fa, fb in zip(official_model.embed(a), reloaded.embed(b)):
        assert torch.equal(fa, fb)
    for la, lb in zip(official_model.draw(a), reloaded.draw(b)):
        assert torch.equal(la, lb)
    # Loading only some components reads only their weights.
    enc_only = viq.load(tmp_path / "converted", components=["encoder"])
    assert enc_only.components == ("encoder",)
    assert all(x.same_codes(y) for x, y in zip(a, enc_only.encode_pixels(px)))


def _codes_and_bounded(model, images) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Codes of ``images`` and the float32 bounded FSQ values they were rounded from, (N, d)."""
    fsq = model.head.fsq
    seen: list[torch.Tensor] = []
    quantize = fsq.quantize

    def capture(z):
        seen.append(fsq.bound(z).reshape(-1, fsq.dim))
        return quantize(z)

    fsq.quantize = capture  # an instance attribute: this model object only
    try:
        codes = [c.flat() for c in model.encode_pixels(images)]
    finally:
        del fsq.quantize
    return codes, torch.cat(seen)


def test_bfloat16_load_agrees_with_float32(official_dir, fixture):
    """bf16 inference (the official dtype) gives the float32 code wherever bf16 moved every bounded FSQ
    value by less than its float32 distance to a rounding boundary: true by construction of rounding,
    whatever a CPU's bf16 kernels do. (How far bf16 moves values depends on those kernels: through
    this random network up to half a level on one machine, so no share of agreeing codes is asserted.)"""
    images = pixels(fixture)
    codes32, b32 = _codes_and_bounded(viq.load(official_dir, num_heads=4, components=["encoder"]), images)
    codes16, b16 = _codes_and_bounded(
        viq.load(official_dir, dtype=torch.bfloat16, num_heads=4, components=["encoder"]), images
    )
    for i, c in enumerate(codes32):  # the float32 load is the golden one
        assert torch.equal(c, fixture["expected"][f"indices_{i}"].flatten())
    margin = 0.5 - (b32 - b32.round()).abs()  # distance of each value to its rounding boundary
    error = (b16 - b32).abs()
    decided = (error < margin).all(-1)  # per code: bf16 cannot have rounded any channel differently
    same = torch.cat(codes16) == torch.cat(codes32)
    assert decided.any(), "bf16 moved every code past its rounding margin: the check below would be empty"
    assert same[decided].all(), f"{int((~same[decided]).sum())} codes differ although bf16 stayed within the margin"


def test_size_detection_from_file_name_without_embedder(official_dir, tmp_path):
    shutil.copy(official_dir / "model_viq_fsq_16k.pth", tmp_path / "model_viq_fsq_16k.pth")
    model = viq.load(tmp_path, num_heads=4)
    assert model.levels == (8, 8, 8, 6, 5)
    assert "embedder" not in model.components and "drawer" not in model.components
    assert "vae" in model.components  # taken from the encoder file's copy
    (tmp_path / "model_viq_fsq_16k.pth").rename(tmp_path / "model_viq_fsq_custom.pth")
    with pytest.raises(ValueError, match="levels"):
        viq.load(tmp_path, num_heads=4)
    assert viq.load(tmp_path, num_heads=4, levels=(8, 8, 8, 6, 5)).levels == (8, 8, 8, 6, 5)


def test_unknown_width_needs_num_heads(official_dir):
    with pytest.raises(ValueError, match="num_heads"):
        viq.load(official_dir)


def test_levels_from_codebook_for_every_size(official_dir):
    states = load_official_state_dicts(official_dir)
    for levels in viq.model.config.FSQ_LEVELS.values():
        k, d = int(torch.tensor(levels).prod()), len(levels)
        fake = {"encoder": dict(states["encoder"]), "embedder": {"ori_codebook.weight": torch.zeros(k, d)}}
        fake["encoder"]["fusion_block.vq_low.project_in.weight"] = torch.zeros(d, 64)
        assert detect_config(fake, num_heads=4).head.levels == levels


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda sd: sd.update({"fusion_block.some_new_layer.weight": torch.zeros(1)}), "not part of the official"),
        (lambda sd: sd.pop("blocks.1.attn.proj.bias"), "missing"),
        (lambda sd: sd.update({"blocks.0.mlp.fc2.bias": torch.zeros(65)}), "shape"),
    ],
    ids=["unknown-key", "missing-key", "bad-shape"],
)
def test_bad_official_files_are_named_errors(official_dir, tmp_path, change, message):
    for f in official_dir.glob("*.pth"):
        shutil.copy(f, tmp_path / f.name)
    sd = torch.load(tmp_path / "model_viq_fsq_16k.pth", weights_only=True)
    change(sd)
    torch.save(sd, tmp_path / "model_viq_fsq_16k.pth")
    with pytest.raises(ValueError, match=message) as err:
        viq.load(tmp_path, num_heads=4)
    assert str(tmp_path) in str(err.value)


def test_corrupt_official_file(official_dir, tmp_path):
    for f in official_dir.glob("*.pth"):
        shutil.copy(f, tmp_path / f.name)
    data = (tmp_path / "embedder.pth").read_bytes()
    (tmp_path / "embedder.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="embedder.pth"):
        viq.load(tmp_path, num_heads=4)
