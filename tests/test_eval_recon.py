"""viq.eval.recon: PSNR/SSIM against torchmetrics and hand formulas, baselines, aggregation."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("torchmetrics")
from torchmetrics.functional.image import (  # noqa: E402
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from viq.eval.baselines import bicubic_at_bits, bicubic_size_at_bits, mean_colour  # noqa: E402
from viq.eval.intervals import t_quantile_975  # noqa: E402
from viq.eval.recon import ReconStats, crop_to, psnr_ssim, ssim_kernel  # noqa: E402
from viq.eval.seams import seam_ratio  # noqa: E402
from viq.formats.image import to_pil, to_pixels  # noqa: E402


def pixels(h: int, w: int, seed: int) -> torch.Tensor:
    """(3, h, w) float32 in [-1, 1] on the 8-bit grid, smooth enough for SSIM to be informative."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, max(2, h // 4), max(2, w // 4), generator=g)
    x = torch.nn.functional.interpolate(base[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    x = (x + 0.1 * torch.rand(3, h, w, generator=g)).clamp(0, 1)
    return (x * 255).round() / 255 * 2 - 1


def noisy(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def unit(x: torch.Tensor) -> torch.Tensor:
    return (x.float() * 0.5 + 0.5).clamp(0, 1)[None]


# ----------------------------------------------------------------------------------------------
# PSNR / SSIM
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w", "sigma"), [(32, 48, 0.05), (37, 21, 0.2), (11, 11, 0.1), (64, 17, 0.01)])
def test_psnr_ssim_match_torchmetrics_and_hand_formula(h, w, sigma):
    # A padded decode (multiple of 16) cropped back to the encoded area, as the caller does.
    ref = pixels(h, w, seed=h * w)
    ph, pw = -(-h // 16) * 16, -(-w // 16) * 16
    decoded = torch.nn.functional.pad(noisy(ref, sigma, seed=1), (0, pw - w, 0, ph - h), value=0.7)
    rec = crop_to(decoded, (h, w))
    assert rec.shape == ref.shape

    psnr, ssim = psnr_ssim(ref, rec)
    assert isinstance(psnr, float) and isinstance(ssim, float)
    want_psnr = float(peak_signal_noise_ratio(unit(rec), unit(ref), data_range=1.0))
    want_ssim = float(structural_similarity_index_measure(unit(rec), unit(ref), data_range=1.0))
    assert abs(psnr - want_psnr) <= 1e-5
    assert abs(ssim - want_ssim) <= 1e-5
    # PSNR by hand, float64: 10 log10(1 / MSE) over all 3*H*W values in [0, 1].
    mse = ((ref.double() * 0.5 + 0.5) - (rec.double() * 0.5 + 0.5)).pow(2).mean().item()
    assert abs(psnr - 10 * math.log10(1.0 / mse)) <= 1e-4
    assert -1.0 <= ssim < 1.0


def hand_ssim(ref: torch.Tensor, rec: torch.Tensor, kh: int, kw: int, sh: float, sw: float) -> float:
    """SSIM in float64 numpy, written from Wang et al. (2004): gaussian-weighted local statistics,
    c1 = 0.01^2, c2 = 0.03^2 (data range 1), mean over channels and all positions, borders
    reflect-padded (excluding the edge pixel, torch's "reflect")."""
    a, b = (unit(t)[0].double().numpy() for t in (ref, rec))

    def g(k, s):
        d = np.arange(k) - (k - 1) / 2
        v = np.exp(-0.5 * (d / s) ** 2)
        return v / v.sum()

    gh, gw = g(kh, sh), g(kw, sw)
    ph, pw = (kh - 1) // 2, (kw - 1) // 2

    def blur(x):
        x = np.pad(x, ((0, 0), (ph, ph), (pw, pw)), mode="reflect")
        x = np.stack([np.convolve(r, gw, mode="valid") for r in x.reshape(-1, x.shape[-1])]).reshape(3, x.shape[1], -1)
        x = np.moveaxis(x, 1, 2)
        x = np.stack([np.convolve(r, gh, mode="valid") for r in x.reshape(-1, x.shape[-1])]).reshape(3, x.shape[1], -1)
        return np.moveaxis(x, 1, 2)

    ma, mb = blur(a), blur(b)
    va = np.maximum(blur(a * a) - ma**2, 0)
    vb = np.maximum(blur(b * b) - mb**2, 0)
    cov = blur(a * b) - ma * mb
    c1, c2 = 0.01**2, 0.03**2
    m = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    assert m.shape == a.shape
    return float(m.mean())


@pytest.mark.parametrize(("h", "w"), [(24, 40), (13, 30), (11, 11), (7, 16), (4, 5)])
def test_ssim_matches_an_independent_float64_implementation(h, w):
    ref, rec = pixels(h, w, seed=3), noisy(pixels(h, w, seed=3), 0.1, seed=4)
    _, ssim = psnr_ssim(ref, rec)
    (kh, kw), (sh, sw) = ssim_kernel(h, w)
    assert abs(ssim - hand_ssim(ref, rec, kh, kw, sh, sw)) <= 1e-5
    if min(h, w) >= 11:
        assert abs(ssim - hand_ssim(ref, rec, 11, 11, 1.5, 1.5)) <= 1e-5


def test_psnr_orders_noise_levels():
    ref = pixels(32, 32, seed=0)
    scores = [psnr_ssim(ref, noisy(ref, s, seed=2)) for s in (0.01, 0.05, 0.2)]
    assert scores[0][0] > scores[1][0] > scores[2][0]
    assert scores[0][1] > scores[1][1] > scores[2][1]


@pytest.mark.parametrize(("h", "w"), [(16, 16), (5, 9), (3, 3)])
@pytest.mark.parametrize("flat", [False, True])
def test_identical_images_give_inf_psnr_and_ssim_one(h, w, flat):
    ref = torch.full((3, h, w), 0.2) if flat else pixels(h, w, seed=5)
    assert psnr_ssim(ref, ref.clone()) == (math.inf, 1.0)  # documented: no PSNR cap, SSIM exactly 1
    # values that map to the same clamped image are identical too
    wild = torch.where(ref >= 1, torch.tensor(3.0), torch.where(ref <= -1, torch.tensor(-2.0), ref))
    assert flat or not torch.equal(wild, ref)
    assert psnr_ssim(ref, wild) == (math.inf, 1.0)
    # torchmetrics' own PSNR for MSE 0 is inf as well (the short cut changes nothing there)
    assert float(peak_signal_noise_ratio(unit(ref), unit(ref), data_range=1.0)) == math.inf


def test_values_outside_range_are_clamped_like_a_displayed_image():
    ref = pixels(16, 16, seed=6)
    rec = noisy(ref, 0.1, seed=7)
    wild = rec.clone()
    wild[:, :4] = torch.where(rec[:, :4] > 0, 1.7, -1.4)
    clamped = wild.clamp(-1, 1)
    assert psnr_ssim(ref, wild) == psnr_ssim(ref, clamped)


def test_half_precision_inputs_are_scored_in_float32():
    ref = pixels(20, 20, seed=8)
    rec = noisy(ref, 0.05, seed=9)
    want = psnr_ssim(ref.half().float(), rec.half().float())
    assert psnr_ssim(ref.half(), rec.half()) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize(
    ("h", "w", "kernel"),
    [(11, 11, (11, 11)), (10, 20, (9, 11)), (7, 4, (7, 3)), (3, 6, (3, 5)), (40, 8, (11, 7))],
)
def test_small_images_use_the_largest_odd_ssim_kernel_that_fits(h, w, kernel):
    (kh, kw), (sh, sw) = ssim_kernel(h, w)
    assert (kh, kw) == kernel
    # torchmetrics derives the gaussian window from sigma: our sigma must give exactly this window.
    for k, s in ((kh, sh), (kw, sw)):
        assert int(3.5 * s + 0.5) * 2 + 1 == k
        assert s == pytest.approx(1.5 * k / 11)
    ref = pixels(h, w, seed=10)
    rec = noisy(ref, 0.1, seed=11)
    _, ssim = psnr_ssim(ref, rec)
    want = structural_similarity_index_measure(
        unit(rec), unit(ref), data_range=1.0, sigma=(sh, sw), kernel_size=(kh, kw)
    )
    assert abs(ssim - float(want)) <= 1e-5
    assert -1.0 <= ssim < 1.0


@pytest.mark.parametrize(("h", "w"), [(2, 10), (10, 1), (1, 1)])
def test_images_under_3_px_raise_naming_the_size(h, w):
    ref = pixels(max(h, 2), max(w, 2), seed=0)[:, :h, :w]
    with pytest.raises(ValueError, match=re.escape(f"{h}x{w}")):
        psnr_ssim(ref, ref)
    with pytest.raises(ValueError, match="3x3"):
        ssim_kernel(h, w)


@pytest.mark.parametrize(
    ("a", "b"), [((3, 16, 16), (3, 16, 17)), ((3, 32, 16), (3, 16, 32)), ((3, 8, 8), (1, 8, 8)), ((3, 8, 8), (8, 8))]
)
def test_mismatched_or_bad_shapes_name_both_shapes(a, b):
    x, y = torch.zeros(a), torch.zeros(b)
    with pytest.raises(ValueError) as err:
        psnr_ssim(x, y)
    msg = str(err.value)
    assert str(b) in msg
    if len(b) == 3 and b[0] == 3:  # a shape mismatch (not a malformed image): both are named
        assert str(a) in msg


def test_non_tensor_and_integer_inputs_are_rejected():
    with pytest.raises(TypeError):
        psnr_ssim(np.zeros((3, 8, 8), np.float32), torch.zeros(3, 8, 8))
    with pytest.raises(TypeError, match="float"):
        psnr_ssim(torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(3, 8, 8))


def test_crop_to_takes_the_top_left_corner():
    x = torch.arange(3 * 32 * 48, dtype=torch.float32).reshape(3, 32, 48)
    c = crop_to(x, (20, 33))
    assert c.shape == (3, 20, 33)
    assert torch.equal(c, x[:, :20, :33])
    assert crop_to(x, (32, 48)).shape == x.shape
    for bad in ((33, 10), (10, 49), (0, 5)):
        with pytest.raises(ValueError, match=re.escape(str(tuple(x.shape)))):
            crop_to(x, bad)


# ----------------------------------------------------------------------------------------------
# baselines
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1.0, 1.0, 0.3, -0.12345, 2 * 77 / 255 - 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mean_colour_of_a_constant_image_is_exact(value, dtype):
    colour = torch.tensor([value, -value * 0.5, 0.25], dtype=dtype)
    ref = colour[:, None, None].expand(3, 123, 77).clone()
    out = mean_colour(ref)
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.equal(out, ref)
    assert psnr_ssim(ref.float(), out.float())[0] == math.inf


def test_mean_colour_is_the_per_channel_mean():
    ref = pixels(30, 20, seed=12)
    out = mean_colour(ref)
    want = ref.double().mean(dim=(1, 2))
    for c in range(3):
        assert torch.all(out[c] == out[c, 0, 0])
        assert abs(float(out[c, 0, 0]) - float(want[c])) <= 1e-7
    assert out.data_ptr() != ref.data_ptr()


def _all_sizes(height: int, width: int) -> set[tuple[int, int]]:
    """Brute force: every (h', w') reachable with one scale 0 < s <= 1 (round half up), on a grid
    finer than the smallest gap 1/(2HW) between breakpoints, plus the breakpoints themselves."""
    sizes = set()
    n = 4 * height * width
    for j in range(1, n + 1):
        s = Fraction(j, n)
        sizes.add((max(1, math.floor(height * s + Fraction(1, 2))), max(1, math.floor(width * s + Fraction(1, 2)))))
    return sizes


@pytest.mark.parametrize(("height", "width"), [(16, 16), (30, 17), (9, 40), (1, 25), (48, 32), (7, 7), (13, 50)])
@pytest.mark.parametrize("pixels_budget", [0.5, 1, 2, 3, 5.5, 17, 64, 100, 257, 10_000])
def test_bicubic_size_is_the_largest_that_fits_the_budget(height, width, pixels_budget):
    bits = pixels_budget * 24
    h, w = bicubic_size_at_bits(height, width, bits)
    sizes = _all_sizes(height, width)
    assert (h, w) in sizes  # reachable with one aspect-preserving scale factor
    fitting = [sz for sz in sizes if sz[0] * sz[1] * 24 <= bits]
    if not fitting:  # documented floor: 1x1 even when 24 bits exceed the budget
        assert (h, w) == (1, 1) and bits < 24
        return
    assert h * w * 24 <= bits
    assert h * w == max(a * b for a, b in fitting)
    # sizes are nested (monotone in s): the next larger reachable size exceeds the budget
    larger = [sz for sz in sizes if sz[0] * sz[1] > h * w]
    if larger:
        nxt = min(larger, key=lambda sz: sz[0] * sz[1])
        assert nxt[0] >= h and nxt[1] >= w
        assert nxt[0] * nxt[1] * 24 > bits
    else:
        assert (h, w) == (height, width)


@pytest.mark.parametrize(
    ("height", "width", "bits", "want"),
    [
        (100, 60, 600 * 24, (31, 19)),  # 589 px; (32, 19) = 608 px would not fit
        (64, 64, 256 * 24, (16, 16)),  # exactly on budget
        (64, 64, 256 * 24 - 1, (15, 15)),
        (1000, 10, 24 * 100, (100, 1)),
        (50, 40, 10**9, (50, 40)),  # everything fits: no downsampling
        (50, 40, 23, (1, 1)),  # not even one pixel fits: 1x1 anyway
        (50, 40, 0, (1, 1)),
        # a 4032x3024 photo at 24864 px: (137, 182) = 24934 px is the next size and exceeds it
        (3024, 4032, 24864 * 24, (136, 182)),
        (886, 1182, 4144 * 18, (48, 64)),
    ],
)
def test_bicubic_size_examples(height, width, bits, want):
    assert bicubic_size_at_bits(height, width, bits) == want


def test_bicubic_size_rejects_bad_budgets():
    for bad in (-1, math.nan, "100"):
        with pytest.raises(ValueError):
            bicubic_size_at_bits(10, 10, bad)


@pytest.mark.parametrize(("height", "width", "bits"), [(40, 24, 24 * 60), (33, 70, 24 * 111.5), (16, 16, 24)])
def test_bicubic_at_bits_is_pillow_bicubic_down_and_up(height, width, bits):
    ref = pixels(height, width, seed=13)
    out = bicubic_at_bits(ref, bits)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    h, w = bicubic_size_at_bits(height, width, bits)
    img = Image.fromarray((((ref + 1) / 2) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    small = img.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=None)
    assert small.size == (w, h)
    want = small.resize((width, height), Image.Resampling.BICUBIC)
    assert torch.equal(out, to_pixels(want))
    # on the 8-bit grid
    assert torch.equal(to_pixels(to_pil(out)), out)


def test_bicubic_at_bits_full_budget_is_the_quantised_reference():
    ref = noisy(pixels(20, 28, seed=14), 0.01, seed=15)  # off the 8-bit grid
    out = bicubic_at_bits(ref, 20 * 28 * 24)
    assert torch.equal(out, to_pixels(to_pil(ref)))
    assert (out - ref).abs().max() <= 1 / 255 + 1e-6


def test_bicubic_quality_grows_with_bits():
    ref = pixels(48, 64, seed=16)
    psnrs = [psnr_ssim(ref, bicubic_at_bits(ref, 24 * n))[0] for n in (12, 100, 800)]
    assert psnrs[0] < psnrs[1] < psnrs[2]


# ----------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 10, 29, 100, 1000])
def test_t_quantile_matches_scipy(df):
    stats = pytest.importorskip("scipy.stats")
    assert t_quantile_975(df) == pytest.approx(float(stats.t.ppf(0.975, df)), rel=1e-9)


def test_t_quantile_known_values():
    assert t_quantile_975(1) == pytest.approx(12.7062047, abs=1e-6)
    assert t_quantile_975(10) == pytest.approx(2.2281389, abs=1e-6)
    assert t_quantile_975(10**6) == pytest.approx(1.959966, abs=1e-5)


def test_recon_stats_means_and_t_intervals():
    stats = ReconStats()
    psnrs = [20.0, 22.0, 27.0, 25.0, 21.0]
    ssims = [0.5, 0.6, 0.9, 0.8, 0.55]
    for p, s in zip(psnrs, ssims):
        stats.add("viq", p, s)
    stats.add("mean-colour", 9.0, 0.1)
    out = stats.summary()
    assert list(out) == ["viq", "mean-colour"] == stats.methods
    v = out["viq"]
    assert v["n"] == 5 and v["psnr_n_inf"] == 0
    assert v["psnr"] == pytest.approx(23.0) and v["ssim"] == pytest.approx(0.67)
    for key, vals in (("psnr", psnrs), ("ssim", ssims)):
        a = np.asarray(vals)
        half = 2.7764451051977987 * a.std(ddof=1) / math.sqrt(len(a))  # t_{0.975, 4}
        lo, hi = v[f"{key}_ci95"]
        assert lo == pytest.approx(a.mean() - half, rel=1e-9)
        assert hi == pytest.approx(a.mean() + half, rel=1e-9)
    one = out["mean-colour"]
    assert one["n"] == 1 and one["psnr"] == 9.0
    assert one["psnr_ci95"] == [None, None] and one["ssim_ci95"] == [None, None]
    assert stats.values("viq") == {"psnr": psnrs, "ssim": ssims}


def test_recon_stats_exact_reconstruction_makes_mean_psnr_inf():
    stats = ReconStats()
    ref = torch.full((3, 8, 8), 0.2)
    stats.add_images("mean-colour", ref, mean_colour(ref))
    stats.add("mean-colour", 30.0, 0.9)
    s = stats.summary()["mean-colour"]
    assert s["psnr"] == math.inf and s["psnr_ci95"] == [None, None] and s["psnr_n_inf"] == 1
    assert s["ssim"] == pytest.approx(0.95, abs=1e-12) and None not in s["ssim_ci95"]


def test_recon_stats_constant_scores_give_a_zero_width_interval_and_reject_nan():
    stats = ReconStats()
    for _ in range(4):
        stats.add("m", 30.0, 0.9)
    s = stats.summary()["m"]
    assert s["psnr_ci95"] == [30.0, 30.0]
    with pytest.raises(ValueError, match="NaN"):
        stats.add("m", math.nan, 0.5)
    assert stats.summary()["m"]["n"] == 4


def test_recon_stats_add_images_scores_with_psnr_ssim():
    ref = pixels(16, 24, seed=17)
    rec = noisy(ref, 0.05, seed=18)
    stats = ReconStats()
    got = stats.add_images("noise", ref, rec)
    assert got == psnr_ssim(ref, rec)
    assert stats.values("noise") == {"psnr": [got[0]], "ssim": [got[1]]}


# ----------------------------------------------------------------------------------------------
# the whole evaluation: evaluate_reconstruction, JPEG / WebP at equal bpp, rFID, plot and grid
# ----------------------------------------------------------------------------------------------


def photo(name: str, width: int) -> Image.Image:
    """A scikit-image sample photograph, resized (Lanczos) to ``width`` px wide: natural statistics,
    so that the JPEG / WebP bitrates behave like on real images."""
    data = pytest.importorskip("skimage.data")
    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    return image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)


@pytest.fixture(scope="module")
def recon_run(test_model):
    """One evaluation of two photographs whose sizes are not multiples of 16 (so padding exists)."""
    from viq.eval.recon import evaluate_reconstruction

    images = [photo("rocket", 256), photo("chelsea", 320)]  # 256x171, 320x213
    result = evaluate_reconstruction(test_model, images, curve_qualities=(5, 50), examples=2, fid_features="viq")
    return images, result


def test_evaluate_reconstruction_scores_equal_torchmetrics_on_the_encoded_crop(test_model, recon_run):
    from viq.formats.image import preprocess

    images, result = recon_run
    assert result["n"] == 2 and result["failed"] == []
    for image, record in zip(images, result["images"]):
        ref = preprocess(image).pixels
        h, w = ref.shape[-2:]
        assert record["size"] == [h, w] and (h % 16, w % 16) != (0, 0)
        codes = test_model.encode_pixels([ref])[0]
        canvas = test_model.decode_latents(test_model.draw([codes]))[0].float()
        assert canvas.shape[-2:] == (-(-h // 16) * 16, -(-w // 16) * 16)  # the padded canvas
        crop = ((canvas[:, :h, :w] * 0.5 + 0.5).clamp(0, 1) * 255).round() / 255  # the 8-bit image the user gets
        want_psnr = float(peak_signal_noise_ratio(crop[None], unit(ref), data_range=1.0))
        want_ssim = float(structural_similarity_index_measure(crop[None], unit(ref), data_range=1.0))
        assert abs(record["psnr"] - want_psnr) <= 1e-4
        assert abs(record["ssim"] - want_ssim) <= 1e-4
        # seams: seam_ratio of the same 8-bit crop on the VAE's block grid
        assert record["seams"] == pytest.approx(seam_ratio(ref, crop * 2 - 1, 8), rel=1e-4)
        # bits per pixel: the serialised .viq file over the encoded pixels (not the padded canvas)
        assert record["bytes"] == len(codes.to_bytes())
        assert record["bpp"] == pytest.approx(8 * len(codes.to_bytes()) / (h * w), rel=1e-12)
        assert record["payload_bpp"] == pytest.approx(codes.num_codes * codes.bits_per_code / (h * w), rel=1e-12)
    assert result["psnr"] == pytest.approx(np.mean([r["psnr"] for r in result["images"]]), abs=1e-9)
    assert result["bpp"] == pytest.approx(np.mean([r["bpp"] for r in result["images"]]), abs=1e-12)
    assert result["seam_period"] == 8
    assert result["seams"] == pytest.approx(np.mean([r["seams"] for r in result["images"]]), abs=1e-9)


def test_jpeg_and_webp_are_matched_to_the_codes_bpp_and_scored_on_the_same_crop(recon_run):
    import io

    from viq.formats.image import preprocess

    images, result = recon_run
    for image, record in zip(images, result["images"]):
        ref = preprocess(image).pixels
        h, w = ref.shape[-2:]
        for codec, fmt, options in (("jpeg", "JPEG", {"optimize": True}), ("webp", "WEBP", {"method": 6})):
            r = record[codec]
            assert r["status"] == "matched", r
            assert abs(r["bpp"] / record["bpp"] - 1) <= 0.10
            # Re-encode independently at the reported quality: the same file size and scores.
            buf = io.BytesIO()
            to_pil(ref).save(buf, format=fmt, quality=r["quality"], **options)
            assert r["bytes"] == len(buf.getvalue())
            assert r["bpp"] == pytest.approx(8 * len(buf.getvalue()) / (h * w), rel=1e-12)
            decoded = to_pixels(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
            assert abs(r["psnr"] - float(peak_signal_noise_ratio(unit(decoded), unit(ref), data_range=1.0))) <= 1e-4
            assert (
                abs(r["ssim"] - float(structural_similarity_index_measure(unit(decoded), unit(ref), data_range=1.0)))
                <= 1e-4
            )
            assert r["seams"] == pytest.approx(seam_ratio(ref, decoded, 8), rel=1e-9)
    for codec in ("jpeg", "webp"):
        assert result[codec]["n"] == 2 and result[codec]["matched"] == 2
        assert result[codec]["bpp"] == pytest.approx(np.mean([r[codec]["bpp"] for r in result["images"]]))
        assert result[codec]["seams"] == pytest.approx(np.mean([r[codec]["seams"] for r in result["images"]]))
        curve = result["curves"][codec]
        assert [p["quality"] for p in curve] == [5, 50]
        assert curve[1]["bpp"] > curve[0]["bpp"] and curve[1]["psnr"] > curve[0]["psnr"]


def test_code_usage_is_the_histogram_of_all_codes(test_model, recon_run):
    from viq.formats.bits import usage_stats
    from viq.formats.image import preprocess

    images, result = recon_run
    codes = [test_model.encode_pixels([preprocess(im).pixels])[0] for im in images]
    hist = np.bincount(np.concatenate([c.flat().numpy() for c in codes]), minlength=4096)
    want = usage_stats(hist)
    assert result["usage"]["entropy_bits"] == pytest.approx(want["entropy_bits"])
    assert result["usage"]["usage"] == pytest.approx(want["usage"])
    assert result["usage"]["codes"] == sum(c.num_codes for c in codes)
    assert result["usage"]["log2_codebook"] == 12.0


def test_match_bpp_reports_an_overshoot_instead_of_faking_the_rate():
    from viq.eval.rate_distortion import bpp_of, compress, match_bpp

    image = to_pil(pixels(48, 64, seed=3))  # a tiny image: the JPEG header alone costs > 0.5 bpp
    for codec in ("jpeg", "webp"):
        r = match_bpp(image, codec, 0.05)
        assert r["status"] == "overshoot" and r["quality"] == 1
        assert r["bpp"] == bpp_of(len(compress(image, codec, 1)[0]), (48, 64)) > 0.05 * 1.1
        assert r["rel_error"] == pytest.approx(r["bpp"] / 0.05 - 1)


@pytest.mark.parametrize("codec", ["jpeg", "webp"])
def test_match_bpp_finds_the_quality_of_a_given_file_size(codec):
    from viq.eval.rate_distortion import compress, match_bpp

    image = photo("coffee", 256)
    for quality in (12, 60):
        target = 8 * len(compress(image, codec, quality)[0]) / (image.width * image.height)
        r = match_bpp(image, codec, target)
        assert r["status"] == "matched" and r["bpp"] <= target and abs(r["bpp"] / target - 1) <= 0.10
        # the largest quality within the budget: one more step would exceed the target
        if r["quality"] < 100:
            assert 8 * len(compress(image, codec, r["quality"] + 1)[0]) / (image.width * image.height) > target


def test_rfid_with_viq_features(test_model, recon_run):
    from viq.eval.fid import ViQFeatures, load_feature_extractor, rfid

    _, result = recon_run
    assert result["rfid"] is not None and result["rfid"] >= 0 and result["fid_features"] == "viq"
    extractor = load_feature_extractor("viq", test_model)
    assert isinstance(extractor, ViQFeatures)
    refs = [pixels(40 + 8 * i, 56 - 4 * i, seed=i) for i in range(4)]
    same = rfid(refs, refs, extractor)
    other = rfid(refs, [noisy(r, 0.5, seed=9) for r in refs], extractor)
    assert 0 <= same < 1e-3 * other
    assert other > 0
    assert rfid(refs[:1], refs[:1], extractor) is None  # undefined with one image per side
    feats = extractor(torch.stack([unit(r)[0] for r in refs[:1]]))
    assert feats.shape == (1, test_model.config.encoder.width) and feats.dtype == torch.float32


def test_rfid_with_a_local_transformers_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from viq.eval.fid import load_feature_extractor, rfid

    cfg = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    transformers.ViTModel(cfg).save_pretrained(tmp_path / "vit")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    extractor = load_feature_extractor(f"hf:{tmp_path / 'vit'}")
    refs = [pixels(40, 56, seed=i) for i in range(3)]
    assert extractor(torch.stack([unit(r)[0] for r in refs])).shape == (3, 16)
    assert 0 <= rfid(refs, refs, extractor) < 1e-6
    assert rfid(refs, [noisy(r, 0.5, seed=4) for r in refs], extractor) > 0


def test_feature_specs_never_download():
    from viq.eval.fid import load_feature_extractor

    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_feature_extractor("hf:no-such-org/no-such-model-viq-test")
    with pytest.raises(ValueError, match="unknown feature extractor"):
        load_feature_extractor("inception")
    with pytest.raises(ValueError, match="needs the ViQ model"):
        load_feature_extractor("viq")


def test_plot_and_grid_are_written(tmp_path, recon_run):
    from viq.eval.rate_distortion import comparison_grid, plot_rate_distortion

    _, result = recon_run
    out = plot_rate_distortion(result, tmp_path / "rd.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (640, 460)
    grid = comparison_grid(result["examples"], height=64)
    assert len(result["examples"]) == 2
    # two rows of three panels (each 64 px high, 14 px caption, 4 px gap), widths by aspect ratio
    assert grid.size[1] == 2 * (64 + 14 + 4)
    assert grid.size[0] == 3 * round(320 * 64 / 213) + 2 * 4


def test_failing_images_are_reported_and_the_others_still_scored(test_model, tmp_path):
    from viq.eval.recon import evaluate_reconstruction

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    good = to_pil(pixels(32, 48, seed=5))
    seen = []
    result = evaluate_reconstruction(
        test_model,
        [str(bad), good],
        curve_qualities=(),
        codecs=("jpeg",),
        on_error=lambda source, e: seen.append((source, str(e))),
    )
    assert result["n"] == 1 and result["curves"] == {} and "webp" not in result
    assert [f["source"] for f in result["failed"]] == [str(bad)] and seen[0][0] == str(bad)
    assert str(bad) in seen[0][1]
    with pytest.raises(Exception, match="broken.png"):
        evaluate_reconstruction(test_model, [str(bad)], curve_qualities=())


def test_encoded_area_scores_crop_the_padded_canvas_before_scoring():
    # What training validation and eval-recon both call: the canvas (multiple of 16) is cut back to
    # the reference's own size; the padding, however wrong, never counts.
    ref = pixels(21, 37, seed=11)
    canvas = torch.full((3, 32, 48), -1.0)
    canvas[:, :21, :37] = noisy(ref, 0.1, seed=12)
    from viq.eval.recon import encoded_area_scores

    got = encoded_area_scores(ref, canvas)
    assert got == psnr_ssim(ref, canvas[:, :21, :37])
    assert abs(got[0] - float(peak_signal_noise_ratio(unit(canvas[:, :21, :37]), unit(ref), data_range=1.0))) <= 1e-5
    with pytest.raises(ValueError, match="cannot crop"):
        encoded_area_scores(ref, canvas[:, :16, :])


def test_seam_ratio_finds_a_blockwise_error_and_not_a_smooth_one():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(3, 40, 56, generator=g) * 2 - 1
    # each 8x8 block off by its own amount, plus faint noise: the error jumps only at block edges
    offsets = torch.randn(3, 5, 7, generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)
    blocky = ref + 0.2 * offsets + 0.001 * torch.randn(3, 40, 56, generator=g)
    assert seam_ratio(ref, blocky, 8) > 20
    # a 7-pixel grid never meets the 8-pixel blocks: its lines cross only the faint noise
    assert seam_ratio(ref, blocky, 7) < 2
    # an error that changes the same everywhere (a ramp) has no grid; nor has a constant one
    ramp = ref + 0.01 * torch.arange(56).float().expand(3, 40, 56)
    assert seam_ratio(ref, ramp, 8) == pytest.approx(1.0)
    assert seam_ratio(torch.zeros(3, 40, 56), torch.full((3, 40, 56), 0.3), 8) == 1.0
    assert math.isnan(seam_ratio(ref[:, :8, :8], ref[:, :8, :8] + 0.1, 8))  # no grid line inside 8 px
    with pytest.raises(ValueError, match="shapes differ"):
        seam_ratio(ref, ref[:, :, :8], 8)
    with pytest.raises(ValueError, match="period"):
        seam_ratio(ref, ref, 1)
