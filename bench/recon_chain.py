"""Where a trained ViQ loses reconstruction detail: each stage's own latent decoder, on the same images.

A demo run (``viq demo -o RUN``) trains four models in a row, and each has a decoder from its
representation to the pixel codec's latents. This script decodes the same held-out images (the demo's
``data/test.jsonl``, first ``--images``) through each of them and through the codec alone:

* ``stage1``: trunk features (continuous) -> stage 1's latent decoder (present when its recipe set
  ``loss.recon``);
* ``stage2_1``: the code head's continuous bottleneck -> dequantiser -> stage 2-1's latent decoder;
* ``stage2_2``: FSQ codes -> dequantiser -> stage 2-2's latent decoder;
* ``drawer``: codes -> the drawer (``ViQModel.reconstruct``: what the demo's report scores);
* ``codec``: the pixel codec alone (encode + decode), the ceiling every row shares.

Per row: PSNR on the encoded area (mean over images, 95 % t-interval; pixels rounded to 8 bits as in
the demo's report) and the latent error: MSE over the target latents' variance, per image, in the
decoder's latent space (0 = exact, 1 = no better than the image's mean latent). A drop between two rows
says which step loses the detail: between ``stage1`` and ``stage2_1`` the fresh code head, between
``stage2_1`` and ``stage2_2`` the rounding, between ``stage2_2`` and ``drawer`` the drawer.

With ``--refit STEPS``, each stage's row is repeated (``stage1+refit`` ...) with a copy of its latent
decoder trained STEPS more on that stage's frozen representation of the first ``--refit-images``
training images: a decoder trained jointly with the rest for a few hundred steps is short of what its
representation holds, and the refit rows estimate what it holds (as ``drawer`` does for the codes).

    python -m bench.recon_chain viq-demo
    python -m bench.recon_chain viq-demo --images 64 --out bench/results/recon_chain-demo.json
    python -m bench.recon_chain viq-demo --refit 2000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
STAGES = ("stage1", "stage2_1", "stage2_2")


def stage_model(directory: Path):
    """A stage output as the network it holds (``viq.ViQModel``, every stored part), or None if it has
    no encoder-side latent decoder."""
    import viq

    model = viq.ViQModel.from_pretrained(directory)
    return model.eval() if model.encoder is not None and model.recon is not None else None


def latent_error(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """MSE of a (channels, h, w) latent over the target's variance (both in the same space)."""
    return float(((predicted.float() - target.float()) ** 2).mean() / target.float().var().clamp_min(1e-12))


@torch.no_grad()
def stage_row(model, vae, refs: list[torch.Tensor], decoder=None) -> tuple[list[tuple[float, float]], list[float]]:
    """Per-image (PSNR, SSIM) and latent error of a stage's own decoder (continuous values for stage 1 / 2-1,
    rounded codes for 2-2: whatever its code head produces), or of ``decoder`` in its place, against the
    frozen ``vae``."""
    from viq.eval.recon import encoded_area_scores
    from viq.formats.image import to_pil, to_pixels
    from viq.model.vae import decode_latents, encode_latents

    scores, errors = [], []
    for ref in refs:
        out = model.encode_features([ref])
        recon = decoder if decoder is not None else model.recon
        latent = recon(out.features, out.grids)[0]
        errors.append(latent_error(latent, recon.from_raw(encode_latents(vae, out.padded[0]))))
        pixels = decode_latents(vae, recon.to_raw(latent)).float().clamp(-1, 1)
        scores.append(encoded_area_scores(ref, to_pixels(to_pil(pixels))))
    return scores, errors


def refit_decoder(
    model, vae, train_refs: list[torch.Tensor], steps: int, lr: float, batch_size: int = 32, seed: int = 0
):
    """A copy of ``model.recon`` (the stage's latent decoder) trained ``steps`` more on the stage's frozen
    representation of ``train_refs`` (each (3, H, W) in [-1, 1]): AdamW at ``lr`` on the recipes' schedule
    (:func:`viq.train.optim.lr_multiplier`, 5 % warm-up, cosine to a tenth), batches of ``batch_size``
    images drawn with ``seed``, the latent MSE per image averaged over the batch (the recipes' latent loss).
    Returns the decoder in eval mode."""
    import copy

    from viq.model.vae import encode_latents
    from viq.train.optim import lr_multiplier

    features, grids, targets = [], [], []
    with torch.no_grad():
        for ref in train_refs:
            out = model.encode_features([ref])
            features.append(out.features[0])
            grids.append(out.grids[0])
            targets.append(model.recon.from_raw(encode_latents(vae, out.padded[0])).float())
    decoder = copy.deepcopy(model.recon).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, steps, 0.05, 0.1))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(len(features), (batch_size,), generator=generator).tolist()
        predicted = decoder([features[i] for i in batch], [grids[i] for i in batch])
        loss = torch.stack(
            [((p.float() - targets[i]) ** 2).mean() for p, i in zip(predicted, batch, strict=True)]
        ).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return decoder.eval()


@torch.no_grad()
def drawer_row(model, refs: list[torch.Tensor]) -> tuple[list[tuple[float, float]], list[float]]:
    """Per-image (PSNR, SSIM) (``ViQModel.reconstruct``) and latent error of a full model's drawer."""
    from viq.eval.recon import psnr_ssim
    from viq.formats.image import to_pixels
    from viq.model.encoder import pad_to_patches
    from viq.model.vae import encode_latents

    decoder = model.drawer.latent
    scores, errors = [], []
    for ref in refs:
        codes = model.encode_pixels([ref])[0]
        drawn = model.draw([codes])[0]
        target = encode_latents(model.vae, pad_to_patches(ref, model.patch_size))
        errors.append(latent_error(decoder.from_raw(drawn), decoder.from_raw(target)))
        scores.append(psnr_ssim(ref, to_pixels(model.reconstruct([codes])[0])))
    return scores, errors


@torch.no_grad()
def codec_row(vae, refs: list[torch.Tensor], scale_factor: int) -> list[tuple[float, float]]:
    """Per-image (PSNR, SSIM) of the codec alone (encode + decode), each image padded to a multiple of
    the codec's ``scale_factor`` only, as in the demo's report."""
    from viq.eval.recon import encoded_area_scores
    from viq.formats.image import to_pil, to_pixels
    from viq.model.encoder import pad_to_patches
    from viq.model.vae import decode_latents, encode_latents

    out = []
    for ref in refs:
        pixels = decode_latents(vae, encode_latents(vae, pad_to_patches(ref, scale_factor))).float().clamp(-1, 1)
        out.append(encoded_area_scores(ref, to_pixels(to_pil(pixels))))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a demo output folder (viq demo -o RUN)")
    parser.add_argument("--images", type=int, default=32, help="held-out images (the demo's report uses 32)")
    parser.add_argument("--max-pixels", type=int, default=96 * 96, help="area bound when encoding (the demo's)")
    parser.add_argument("--out", default=None, help="record path (default bench/results/recon_chain-...json)")
    parser.add_argument("--note", default="", help="what the run is (stored in the record)")
    parser.add_argument("--refit", type=int, default=0, metavar="STEPS", help="also refit each stage's decoder")
    parser.add_argument("--refit-images", type=int, default=2000, help="training images the refit uses")
    parser.add_argument("--refit-lr", type=float, default=4e-3, help="the refit's peak learning rate")
    args = parser.parse_args(argv)

    import viq
    from bench.common import write_record
    from viq.data.folder import find_images
    from viq.demo.synthetic import load_split
    from viq.formats.image import PreprocessConfig, preprocess

    data = args.run / "data"
    records = [r for r in load_split(data, "test") if "image" in r][: args.images]
    if not records:
        parser.error(f"no test images in {data / 'test.jsonl'}")
    pre = PreprocessConfig(max_pixels=args.max_pixels)
    refs = [preprocess(data / r["image"], pre).pixels for r in records]

    train_refs: list[torch.Tensor] = []
    if args.refit:  # read once, refitted on by every stage
        train_dir = data / "images" / "train"
        files = find_images(str(train_dir), "raise")[: args.refit_images] if train_dir.is_dir() else []
        if not files:
            parser.error(f"--refit: no training images in {train_dir}")
        train_refs = [preprocess(f, pre).pixels for f in files]

    runs = args.run / "runs"
    drawer = runs / "drawer" / "final"
    full = viq.load(drawer) if (drawer / "model.safetensors").is_file() else None
    codec = full if full is not None else viq.load(args.run / "init", components=("vae",))
    vae = codec.vae.eval()

    rows: dict[str, dict] = {}
    for stage in STAGES:
        directory = runs / stage / "final"
        model = stage_model(directory) if (directory / "model.safetensors").is_file() else None
        if model is not None:
            scores, errors = stage_row(model, vae, refs)
            rows[stage] = {"scores": scores, "latent_error": errors}
            if args.refit:
                decoder = refit_decoder(model, vae, train_refs, args.refit, args.refit_lr)
                scores, errors = stage_row(model, vae, refs, decoder)
                rows[f"{stage}+refit"] = {"scores": scores, "latent_error": errors}
    if full is not None:
        scores, errors = drawer_row(full, refs)
        rows["drawer"] = {"scores": scores, "latent_error": errors}
    rows["codec"] = {"scores": codec_row(vae, refs, codec.config.vae.scale_factor), "latent_error": [0.0] * len(refs)}

    from viq.eval.recon import ReconStats

    stats = ReconStats()
    for name, row in rows.items():
        for psnr, ssim in row["scores"]:
            stats.add(name, psnr, ssim)
    summary = {}
    print(f"{'decoder':10s} {'PSNR dB (95 % CI)':>24s} {'SSIM':>6s} {'latent error':>13s}")
    for name, scores in stats.summary().items():
        ci = scores["psnr_ci95"]
        error = sum(rows[name]["latent_error"]) / len(refs)
        summary[name] = {"psnr": scores["psnr"], "psnr_ci95": ci, "ssim": scores["ssim"], "latent_error": error}
        interval = f"({ci[0]:.2f}-{ci[1]:.2f})" if ci[0] is not None else ""
        print(f"{name:10s} {scores['psnr']:10.2f} {interval:>13s} {scores['ssim']:6.3f} {error:13.3f}")
    per_image = {
        name: {"psnr": [p for p, _ in row["scores"]], "latent_error": row["latent_error"]} for name, row in rows.items()
    }
    record = {
        "run": str(args.run),
        "note": args.note,
        "images": len(refs),
        "refit": {"steps": args.refit, "images": args.refit_images, "lr": args.refit_lr} if args.refit else None,
        "summary": summary,
        "per_image": per_image,
    }
    path = write_record("recon_chain", torch.device("cpu"), record, out=args.out)
    print(path)
    return record


if __name__ == "__main__":
    main()
