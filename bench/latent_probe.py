"""How much of the pixel codec's latents a demo encoder's trunk still carries: a linear probe.

For each model directory of a demo run (``viq demo -o RUN``: ``init``, ``runs/stage1/final``, ...), the
trunk features of held-out images (one vector per 16x16 patch) are regressed onto the codec's latents of
the same patch (2x2 latent pixels x 16 channels = 64 values), by ridge regression fitted on training
images. Reported: the share of the latents' variance the probe leaves unexplained on held-out images
(normalised MSE: 0 = all of it is linearly there, 1 = none), beside the raw 16x16 pixels of the patch as
the probe's input (the codec is nearly linear, so this is close to 0). This is the measurement behind
"stage 1 throws the detail away" in docs/training.md.

    python -m bench.latent_probe viq-demo                      # init + every stage of a demo run
    python -m bench.latent_probe viq-demo --models init runs/stage1/final
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
STAGES = ("init", "runs/stage1/final", "runs/stage2_1/final", "runs/stage2_2/final")


def _trunk(directory: Path):
    """The ViTEncoder stored in a model directory (any stage's output: ``encoder.*`` tensors)."""
    from safetensors.torch import load_file

    from viq.model.config import ViQConfig
    from viq.model.encoder import ViTEncoder

    encoder = ViTEncoder(ViQConfig.load(directory / "config.json").encoder)
    state = load_file(str(directory / "model.safetensors"))
    encoder.load_state_dict({k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")})
    return encoder.eval()


@torch.no_grad()
def patch_features(encoder, images: list[torch.Tensor]) -> torch.Tensor:
    """(N patches, C) trunk tokens of the images, in row-major patch order, filler removed."""
    tokens, packed = encoder(images)
    return torch.cat(packed.split(tokens))


@torch.no_grad()
def patch_latents(vae, images: list[torch.Tensor]) -> torch.Tensor:
    """(N patches, 4 * channels) codec latents, the 2x2 latent pixels of each 16x16 patch."""
    from viq.model.vae import encode_latents

    rows = []
    for x in images:
        z = encode_latents(vae, x)
        c, h, w = z.shape
        rows.append(z.view(c, h // 2, 2, w // 2, 2).permute(1, 3, 0, 2, 4).reshape(-1, 4 * c))
    return torch.cat(rows)


def patch_pixels(images: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([F.unfold(x[None], 16, stride=16)[0].T for x in images])


def ridge_nmse(
    x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, alpha: float = 1e-2
) -> float:
    """Held-out MSE of a ridge fit (standardised inputs, bias, penalty alpha * n) over the targets'
    variance, averaged over target dimensions."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    a = torch.cat([(x_train - mean) / std, torch.ones(len(x_train), 1)], 1).double()
    b = torch.cat([(x_test - mean) / std, torch.ones(len(x_test), 1)], 1).double()
    w = torch.linalg.solve(a.T @ a + alpha * len(a) * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y_train.double())
    y = y_test.double()
    return float(((b @ w - y) ** 2).mean() / y.var(0).mean())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a demo output folder (viq demo -o RUN)")
    parser.add_argument(
        "--models", nargs="+", default=None, help=f"model dirs inside RUN (default: {' '.join(STAGES)})"
    )
    parser.add_argument("--train-images", type=int, default=600)
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--out", default=None, help="record path (default bench/results/latent_probe-...json)")
    parser.add_argument("--note", default="", help="what the run is (stored in the record)")
    args = parser.parse_args(argv)

    import viq
    from bench.common import write_record
    from viq.formats.image import PreprocessConfig, preprocess
    from viq.model.encoder import pad_to_patches

    pre = PreprocessConfig(max_pixels=96 * 96)  # the demo's area bound

    def load(folder: Path, n: int) -> list[torch.Tensor]:
        files = sorted(folder.glob("*.png"))[:n]
        if not files:
            parser.error(f"no images in {folder}")
        return [pad_to_patches(preprocess(f, pre).pixels, 16) for f in files]

    train = load(args.run / "data" / "images" / "train", args.train_images)
    test = load(args.run / "data" / "images" / "test", args.test_images)
    vae = viq.load(args.run / "init", components=("vae",)).vae.eval()
    y_train, y_test = patch_latents(vae, train), patch_latents(vae, test)
    results = {"pixels": ridge_nmse(patch_pixels(train), y_train, patch_pixels(test), y_test)}
    for name in args.models or [m for m in STAGES if (args.run / m / "model.safetensors").is_file()]:
        encoder = _trunk(args.run / name)
        results[name] = ridge_nmse(patch_features(encoder, train), y_train, patch_features(encoder, test), y_test)
    for name, value in results.items():
        print(f"{name:28s} unexplained latent variance {value:.3f}")
    record = {
        "run": str(args.run),
        "note": args.note,
        "train_images": len(train),
        "test_images": len(test),
        "train_patches": len(y_train),
        "test_patches": len(y_test),
        "unexplained_variance": results,
    }
    path = write_record("latent_probe", torch.device("cpu"), record, out=args.out)
    print(path)
    return record


if __name__ == "__main__":
    main()
