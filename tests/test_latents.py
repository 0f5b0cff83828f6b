"""The latent codec (Qwen-Image VAE or the demo's pixel codec) and normalised latent targets."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import viq
from conftest import random_pixels
from train_helpers import make_qa, recipe
from viq.demo.pixel_codec import DEMO_CODEC, train_pixel_codec
from viq.formats.image import to_pil
from viq.model.config import get_preset
from viq.model.decoders import LatentDecoder
from viq.model.pixel_codec import PixelCodec
from viq.model.vae import build_vae, decode_latents, encode_latents, latent_statistics
from viq.model.viq import ViQModel
from viq.train.build import build_model
from viq.train.config import TrainConfig
from viq.train.output import save_stage_output

CPU = torch.device("cpu")


def test_pixel_codec_contract_and_fit():
    images = [random_pixels(40, 56, seed=i) for i in range(6)]
    codec = train_pixel_codec(images, DEMO_CODEC, steps=12, batch_size=4, crop=24, seed=1, progress=False)
    x = torch.stack([images[0][:, :40, :56].clone()[:, :40, :48]])
    z = codec.encode(x)
    assert z.shape == (1, 16, 5, 6)
    y = codec.decode(z)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert encode_latents(codec, x[0]).shape == (16, 5, 6) and decode_latents(codec, z[0]).shape == (3, 40, 48)
    assert latent_statistics(codec) == ((0.0,) * 16, (1.0,) * 16)  # its latents come normalised
    with pytest.raises(ValueError, match="multiples of 8"):
        codec.encode(torch.zeros(1, 3, 20, 16))
    again = train_pixel_codec(images, DEMO_CODEC, steps=12, batch_size=4, crop=24, seed=1, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(codec.state_dict().values(), again.state_dict().values()))
    assert len(codec.history) == 12


def test_pixel_codec_latent_noise_is_relative_to_the_latents_spread():
    """The noise scales with the latents (the encoder cannot outgrow it) and is bounded by its strength."""
    from viq.demo.pixel_codec import _latent_noise

    z = torch.randn(8, 16, 3, 4, generator=torch.Generator().manual_seed(0))
    z[:, 3] *= 50  # one channel far larger than the others
    small = _latent_noise(z, 0.3, torch.Generator().manual_seed(1))
    large = _latent_noise(1000 * z, 0.3, torch.Generator().manual_seed(1))
    torch.testing.assert_close(large, 1000 * small, rtol=1e-4, atol=0.0)
    ratio = small.std(dim=(0, 2, 3)) / z.std(dim=(0, 2, 3))  # per channel: at most 0.3, about 0.3 / sqrt(3)
    assert ratio[3] < 0.3 and ratio[0] < 0.3 and abs(float(ratio[3] / ratio[0]) - 1) < 0.5
    assert not _latent_noise(z, 0.0, torch.Generator()).any()
    images = [random_pixels(40, 56, seed=i) for i in range(4)]
    with pytest.raises(ValueError, match="latent_noise"):
        train_pixel_codec(images, DEMO_CODEC, steps=2, crop=24, latent_noise=-1, progress=False)
    noisy = train_pixel_codec(images, DEMO_CODEC, steps=6, batch_size=4, crop=24, latent_noise=0.3, progress=False)
    again = train_pixel_codec(images, DEMO_CODEC, steps=6, batch_size=4, crop=24, latent_noise=0.3, progress=False)
    clean = train_pixel_codec(images, DEMO_CODEC, steps=6, batch_size=4, crop=24, progress=False)
    assert noisy.history == again.history and noisy.history != clean.history


def test_pixel_refinement_starts_as_a_no_op_and_older_configs_load_without_it():
    with_refine = dataclasses.replace(DEMO_CODEC, pixel_refine_channels=4)
    without = dataclasses.replace(DEMO_CODEC, pixel_refine_channels=0)
    torch.manual_seed(0)
    refined = PixelCodec(with_refine)
    plain = PixelCodec(without)
    missing, unexpected = plain.load_state_dict(refined.state_dict(), strict=False)
    assert not missing and sorted(unexpected) == [
        "pixel_in.bias",
        "pixel_in.weight",
        "pixel_out.bias",
        "pixel_out.weight",
    ]
    z = torch.randn(2, 16, 3, 5)
    torch.testing.assert_close(refined.decode(z), plain.decode(z), rtol=0, atol=0)
    with torch.no_grad():
        refined.pixel_out.weight.normal_()
    assert not torch.equal(refined.decode(z), plain.decode(z))
    config = ViQModel.from_config("viq-demo", seed=0).config.to_dict()
    del config["vae"]["pixel_refine_channels"]  # a demo model saved before the refinement existed
    from viq.model.config import ViQConfig

    assert ViQConfig.from_dict(config).vae.pixel_refine_channels == 0
    with pytest.raises(ValueError, match="pixel_refine_channels"):
        dataclasses.replace(DEMO_CODEC, pixel_refine_channels=-1)


def test_demo_model_carries_its_pixel_codec(tmp_path):
    model = ViQModel.from_config("viq-demo", seed=0)
    assert isinstance(model.vae, PixelCodec) and model.vae.pixel_in is not None
    with torch.no_grad():
        model.vae.pixel_out.weight.normal_()  # trained refinement weights are stored and loaded back
    model.save_pretrained(tmp_path / "demo")
    loaded = viq.load(tmp_path / "demo")
    assert isinstance(loaded.vae, PixelCodec)
    torch.testing.assert_close(loaded.vae.pixel_out.weight, model.vae.pixel_out.weight, rtol=0, atol=0)
    codes = loaded.encode_pixels([random_pixels(32, 48, seed=0)])
    assert loaded.reconstruct(codes)[0].size == (48, 32)


class _Oracle(LatentDecoder):
    """A latent decoder that outputs a given latent: a drawer trained to perfection."""

    answer: torch.Tensor

    def forward(self, features, grids):
        return [self.answer]


def test_mean_std_latents_are_inverted_end_to_end(tmp_path):
    """A drawer trained on (z - mean) / std reconstructs exactly what decoding the true latents gives,
    with a Qwen-Image VAE whose published statistics are far from 0 / 1."""
    config = get_preset("viq-test")
    ViQModel.from_config(config, seed=0).save_pretrained(tmp_path / "init")
    make_qa(tmp_path / "qa", n=2, size=(32, 48))
    r = recipe("drawer", tmp_path / "run", tmp_path / "qa" / "images", None, loss={"latent_norm": "mean_std"})
    r["model"] = {"init": f"viq:{tmp_path / 'init'}"}
    cfg = TrainConfig.from_dict(r)
    model, _ = build_model(cfg, device=CPU)
    mean, std = latent_statistics(model.vae)
    assert max(abs(m) for m in mean) > 0.5 and max(std) > 2  # far from 0 / 1
    assert model.config.decoder.latent_mean == mean and model.config.decoder.latent_std == std

    x = random_pixels(32, 48, seed=5)
    raw = encode_latents(model.vae, x)
    target = model.vae_target(x)
    m = torch.tensor(mean)[:, None, None]
    s = torch.tensor(std)[:, None, None]
    torch.testing.assert_close(target, (raw - m) / s)
    torch.testing.assert_close(model.drawer.latent.to_raw(target), raw)

    save_stage_output(model, tmp_path / "out", cfg)
    loaded = viq.load(tmp_path / "out")
    assert loaded.config.decoder.latent_mean == mean  # the normalisation travels with the model
    oracle = _Oracle(config.width, loaded.config.decoder)
    oracle.answer = target
    loaded.drawer.latent = oracle
    codes = loaded.encode_pixels([x])
    drawn = loaded.draw(codes)[0]
    torch.testing.assert_close(drawn, raw)
    pixels = np.asarray(loaded.reconstruct(codes)[0]).astype(int)
    truth = np.asarray(to_pil(decode_latents(loaded.vae, raw).float()))[:32, :48].astype(int)
    # drawn equals raw up to float rounding (to_raw is z * std + mean), so the decodes round to the same
    # 8-bit value or, where a value sits on a rounding boundary, to its neighbour (CPU kernels differ)
    assert np.abs(pixels - truth).max() <= 1
    # Decoding the normalised output as if raw (the old bug) would be far off.
    wrong = np.asarray(to_pil(decode_latents(loaded.vae, target).float()))[:32, :48]
    assert np.abs(wrong.astype(int) - truth).mean() > 1


def test_raw_latent_models_are_unchanged():
    decoder = dataclasses.replace(get_preset("viq-test").decoder)
    assert decoder.latent_mean is None
    latent = torch.randn(16, 4, 6)
    ld = LatentDecoder(32, decoder)
    assert ld.to_raw(latent) is latent and ld.from_raw(latent) is latent
    with pytest.raises(ValueError, match="together"):
        dataclasses.replace(decoder, latent_mean=(0.0,) * 16)
    assert isinstance(build_vae(get_preset("viq-test").vae), torch.nn.Module)
