"""ViQModel: batch invariance, encode API, decoders, viq-format persistence, real photographs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import viq
from conftest import random_pixels
from viq.formats.image import ImageError, PreprocessConfig, padded_grid, target_size
from viq.model.attention import available_backends
from viq.model.encoder import pad_to_patches
from viq.model.viq import pack_by_budget

SIZES = [(16, 16), (5, 7), (37, 100), (64, 48), (20, 530), (80, 80), (33, 17)]


def pre_quantize_alone_and_packed(model, pixels):
    with torch.no_grad():
        padded = [pad_to_patches(p, 16) for p in pixels]
        alone = []
        for p in padded:
            tokens, packed = model.encoder([p])
            alone.append(packed.split(model.head.pre_quantize(tokens, packed), 4)[0])
        tokens, packed = model.encoder(padded)
        together = packed.split(model.head.pre_quantize(tokens, packed), 4)
    return alone, together


def test_batch_invariance_bitwise(test_model):
    """An image's pre-quantization values, hence its codes, are bit-identical alone and packed."""
    pixels = [random_pixels(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    alone, together = pre_quantize_alone_and_packed(test_model, pixels)
    for i, (a, b) in enumerate(zip(alone, together)):
        assert torch.equal(a, b), f"image {i} {SIZES[i]} changes when packed"
    # Any order, any companions, any packing budget: same codes.
    ref = test_model.encode_pixels(pixels)
    perm = [3, 0, 6, 2, 5, 1, 4]
    shuffled = test_model.encode_pixels([pixels[i] for i in perm])
    for j, i in enumerate(perm):
        assert shuffled[j].same_codes(ref[i])
    for budget in (1, 7, 50, 10**6):
        assert all(a.same_codes(b) for a, b in zip(ref, test_model.encode_pixels(pixels, batch_tokens=budget)))


@pytest.mark.parametrize("backend", [b for b in available_backends("cpu") if b != "sdpa"])
def test_codes_identical_across_attention_backends(test_model, backend):
    pixels = [random_pixels(h, w, seed=10 + i) for i, (h, w) in enumerate(SIZES)]
    ref = test_model.encode_pixels(pixels)
    with torch.no_grad():
        tokens, packed = test_model.encoder([pad_to_patches(p, 16) for p in pixels])
        margins = packed.split(
            0.5
            - (lambda b: (b - b.round()).abs())(
                test_model.head.fsq.bound(test_model.head.pre_quantize(tokens, packed))
            ).amin(-1),
            4,
        )
    test_model.set_attention_backend(backend)
    try:
        other = test_model.encode_pixels(pixels)
    finally:
        test_model.set_attention_backend("auto")
    for a, b, m in zip(ref, other, margins):
        clear = m > 1e-4  # float noise between kernels is ~1e-6; only codes on a rounding edge could flip
        assert clear.float().mean() > 0.99
        assert torch.equal(a.flat()[clear], b.flat()[clear])


def test_encode_inputs_and_grids(test_model, tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    inputs = [str(tmp_path / "a.png"), (tmp_path / "a.png").read_bytes(), Image.fromarray(arr), arr]
    codes = test_model.encode(inputs)
    assert all(c.same_codes(codes[0]) for c in codes)
    assert codes[0].grid == (3, 5) and codes[0].image_size == (45, 70)
    assert codes[0].indices.shape == (3, 5, 4) and codes[0].indices.dtype == torch.int32
    # Same as encode_pixels on the official normalisation of the same pixels.
    px = torch.tensor(arr).permute(2, 0, 1).float() / 255
    assert test_model.encode_pixels([(px - 0.5) / 0.5])[0].same_codes(codes[0])
    assert test_model.encode(arr)[0].same_codes(codes[0])  # a single image gives a list of one
    # Resolution policy: capped area, resize-to-multiple, and the demo's square crop.
    big = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    capped = test_model.encode([big], preprocess=PreprocessConfig(max_pixels=128 * 128))[0]
    assert capped.image_size[0] * capped.image_size[1] <= 128 * 128
    multiple = test_model.encode([big], preprocess=PreprocessConfig(max_pixels=128 * 128, multiple="resize"))[0]
    assert multiple.image_size[0] % 16 == 0 and multiple.image_size[1] % 16 == 0
    square = test_model.encode([big], preprocess=PreprocessConfig(square=64))[0]
    assert square.grid == (4, 4) and square.image_size == (64, 64)


def test_encode_bad_inputs(test_model, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    for name in ("empty.png", "text.png", "missing.png"):
        with pytest.raises(ImageError, match=name):
            test_model.encode([str(tmp_path / name)])
    with pytest.raises(TypeError):
        test_model.encode_pixels(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="shape"):
        test_model.encode_pixels([torch.zeros(4, 16, 16)])
    with pytest.raises(TypeError, match="float"):
        test_model.encode_pixels([torch.zeros(3, 16, 16, dtype=torch.uint8)])


def test_extreme_shapes(test_model):
    one = test_model.encode([np.zeros((1, 1, 3), np.uint8)])[0]
    assert one.grid == (1, 1) and one.image_size == (16, 16)  # upscaled to min_pixels
    strip = test_model.encode([np.full((8, 20000, 3), 200, np.uint8)])[0]
    assert strip.grid == (1, 1250) and strip.image_size == (8, 20000)


def test_decoders_shapes_and_reconstruct(test_model):
    pixels = [random_pixels(h, w, seed=i) for i, (h, w) in enumerate([(37, 100), (16, 16), (50, 20)])]
    codes = test_model.encode_pixels(pixels)
    width = test_model.config.width
    for c, f, z in zip(codes, test_model.embed(codes), test_model.draw(codes)):
        h, w = c.grid
        assert f.shape == (h * w, width)
        assert z.shape == (16, 2 * h, 2 * w)
    for c, image in zip(codes, test_model.reconstruct(codes)):
        assert image.mode == "RGB" and (image.height, image.width) == c.image_size
    padded = test_model.reconstruct(codes, crop=False)
    assert [(im.height, im.width) for im in padded] == [(16 * c.grid[0], 16 * c.grid[1]) for c in codes]
    # embed is per-token: batched == one by one
    for c, f in zip(codes, test_model.embed(codes)):
        assert torch.equal(test_model.embed([c])[0], f)


def test_decoders_reject_foreign_codes(test_model):
    other = viq.Codes(torch.zeros(2, 2, 4, dtype=torch.int32), (8, 8, 8, 6, 5))
    with pytest.raises(ValueError, match="levels"):
        test_model.embed([other])


def test_save_and_load_viq_format(test_model, tmp_path):
    test_model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = viq.load(tmp_path / "m")
    assert loaded.config == test_model.config
    assert loaded.fingerprint() == test_model.fingerprint()
    for (k, a), (k2, b) in zip(test_model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    px = [random_pixels(40, 60, 1)]
    assert loaded.encode_pixels(px)[0].same_codes(test_model.encode_pixels(px)[0])
    bf16 = viq.load(tmp_path / "m", dtype=torch.bfloat16, components=["encoder", "embedder"])
    assert bf16.dtype == torch.bfloat16 and bf16.components == ("encoder", "embedder")
    assert bf16.fingerprint() == test_model.fingerprint()
    with pytest.raises(RuntimeError, match="drawer"):
        bf16.draw(bf16.encode_pixels(px))


def test_load_errors(test_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        viq.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="neither"):
        viq.load(tmp_path)
    test_model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        viq.load(tmp_path / "m")
    test_model.save_pretrained(tmp_path / "m2")
    cfg = tmp_path / "m2" / "config.json"
    cfg.write_text(cfg.read_text().replace('"depth": 2', '"depth": 3'))
    with pytest.raises(ValueError, match="missing"):
        viq.load(tmp_path / "m2")
    cfg.write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        viq.load(tmp_path / "m2")


def test_encode_stream_yields_codes_or_error_per_item_in_order(test_model, tmp_path):
    """One stream for every input kind; a bad item becomes its own error and the stream goes on."""
    import dataclasses

    from viq.formats.image import preprocess

    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(20, 30), (40, 17), (16, 64)]]
    Image.fromarray(arrays[0]).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    prepared = dataclasses.replace(preprocess(arrays[2]), source="third")
    ref = test_model.encode([tmp_path / "a.png", arrays[1], arrays[2]])
    pulled = []

    def items():  # a generator: read lazily, a pack at a time
        for item in [
            tmp_path / "a.png",
            tmp_path / "bad.png",
            arrays[1],
            torch.zeros(4, 8, 8),
            prepared,
            ref[0].flat(),
        ]:
            pulled.append(item)
            yield item

    for budget in (1, 4, 10**6):
        pulled.clear()
        out = list(test_model.encode_stream(items(), batch_tokens=budget))
        assert len(out) == len(pulled) == 6
        assert out[0].same_codes(ref[0]) and out[2].same_codes(ref[1]) and out[4].same_codes(ref[2])
        assert isinstance(out[1], ImageError) and "bad.png" in str(out[1])
        assert isinstance(out[3], ValueError) and "item 3" in str(out[3])  # not (3, H, W)
        assert isinstance(out[5], TypeError) and "item 5" in str(out[5])  # integer tensor: not pixels
        # Keyed: the same results, each with the key it was given (any object), in input order.
        pulled.clear()
        keys = [object() for _ in range(6)]
        keyed = list(test_model.encode_keyed(zip(keys, items()), batch_tokens=budget))
        assert [k for k, _ in keyed] == keys
        for (_, got), want in zip(keyed, out):
            assert type(got) is type(want)
            assert got.same_codes(want) if isinstance(want, viq.Codes) else str(got) == str(want)


def test_pack_by_budget():
    assert pack_by_budget([5, 5, 5], 10) == [[0, 1], [2]]
    assert pack_by_budget([20, 1, 1], 10) == [[0], [1, 2]]
    assert pack_by_budget([], 10) == []


def test_real_photographs_native_resolution(test_model):
    """Photos shipped with scikit-image, at native resolution, follow the documented resize rule."""
    skdata = pytest.importorskip("skimage.data")
    photos = {name: getattr(skdata, name)() for name in ("astronaut", "coffee", "rocket", "chelsea")}
    for cfg in (PreprocessConfig(), PreprocessConfig(max_pixels=200 * 200)):
        codes = test_model.encode(list(photos.values()), preprocess=cfg)
        for (name, arr), c in zip(photos.items(), codes):
            h, w = arr.shape[:2]
            new_w, new_h = target_size(w, h, cfg)
            assert c.image_size == (new_h, new_w), name
            assert c.grid == padded_grid(new_h, new_w, 16), name
            assert c.num_codes == 4 * c.grid[0] * c.grid[1]
    # Native: astronaut 512x512 -> 32x32 patches, rocket 427x640 -> 27x40.
    native = dict(zip(photos, test_model.encode(list(photos.values()))))
    assert native["astronaut"].grid == (32, 32)
    assert native["rocket"].grid == (27, 40)


def test_gradients_flow_through_straight_through_fsq(test_model):
    model = viq.ViQModel.from_config("viq-test", seed=1).train()
    pixels = [pad_to_patches(random_pixels(32, 48, 0), 16)]
    tokens, packed = model.encoder(pixels)
    values = model.head(tokens, packed).values
    model.dequant.from_code_values(values).pow(2).mean().backward()
    assert model.encoder.patch_embed.proj.weight.grad is not None
    assert model.head.project_in.weight.grad.abs().sum() > 0


def test_fingerprint_is_the_same_for_every_component_subset(test_model, official_dir, tmp_path):
    test_model.save_pretrained(tmp_path / "m")
    expected = test_model.fingerprint()
    for components in (["encoder"], ["drawer", "vae"], ["embedder"], None):
        assert viq.load(tmp_path / "m", components=components).fingerprint() == expected
    # A drawer-only model saved again keeps the id of the encoder that defined its codes.
    viq.load(tmp_path / "m", components=["drawer"]).save_pretrained(tmp_path / "d")
    assert viq.load(tmp_path / "d").fingerprint() == expected
    # Official directory, any dtype, any components, and its viq conversion: one id.
    official = viq.load(official_dir, num_heads=4, components=["encoder"])
    ids = {
        official.fingerprint(),
        viq.load(official_dir, num_heads=4, components=["embedder"]).fingerprint(),
        viq.load(official_dir, num_heads=4, dtype=torch.bfloat16, components=["encoder"]).fingerprint(),
    }
    assert len(ids) == 1 and expected not in ids
    bare = viq.ViQModel.from_config("viq-test", components=["embedder"])
    with pytest.raises(RuntimeError, match="no encoder"):
        bare.fingerprint()


def test_describe_model_without_building_it(test_model, tmp_path):
    from viq.formats.bits import bits_for_levels
    from viq.model.inspect import describe_model

    test_model.save_pretrained(tmp_path / "m")
    info = describe_model(tmp_path / "m")
    assert info["format"] == "viq" and info["fingerprint"] == test_model.fingerprint()
    assert info["bits_per_code"] == bits_for_levels(test_model.levels)
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "m" / "model.safetensors"))  # counts stored tensors (buffers too)
    assert info["total_parameters"] == sum(v.numel() for v in stored.values())
    with pytest.raises(FileNotFoundError, match="no such file"):
        describe_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="official"):
        describe_model(tmp_path / "m", num_heads=4)
