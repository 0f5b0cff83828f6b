"""Small builders shared by the training tests: a tiny QA set and a tiny LLM, made offline."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from viq.train.checkpoint import latest_checkpoint
from viq.train.config import TrainConfig
from viq.train.engine import train

COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 210, 40)}


def make_qa(root: Path, n: int = 4, seed: int = 0, size: tuple[int, int] = (40, 56)) -> Path:
    """n single-image QA samples ("What color is the square?" -> colour name) as LLaVA JSONL."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    records = []
    for i in range(n):
        h, w = size
        img = np.full((h, w, 3), 245, np.uint8)
        color = names[i % len(names)]
        y, x = int(rng.integers(0, h - 16)), int(rng.integers(0, w - 16))
        img[y : y + 16, x : x + 16] = COLORS[color]
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        records.append(
            {
                "id": f"s{i}",
                "image": f"images/{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat color is the square?"},
                    {"from": "gpt", "value": color},
                ],
            }
        )
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_llm(root: Path) -> Path:
    from viq.demo.tiny_llm import build_tiny_llm

    corpus = ["What color is the square? " + " ".join(COLORS)] * 20
    return build_tiny_llm(
        root,
        corpus,
        vocab_size=300,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
        initializer_range=0.2,
    )


def make_start(root: Path, seed: int = 3) -> tuple[Path, Path, Path]:
    """A QA set, a tiny LLM and a saved ``viq-test`` model under ``root``: what a chain of stages starts
    from. Returns (data, llm, init directory)."""
    from viq.model.viq import ViQModel

    data, llm = make_qa(root / "qa"), make_llm(root / "llm")
    ViQModel.from_config("viq-test", seed=seed).save_pretrained(root / "init")
    return data, llm, root / "init"


def recipe(stage: str, out: Path, data_path: Path, llm_path: Path | None, **sections) -> dict:
    """A minimal recipe dict for the tiny test model; ``sections`` are merged in."""
    head = {"quantizer": "bottleneck", "code_blocks": 0} if stage == "stage2_1" else {}
    base = {
        "stage": stage,
        "model": {"init": "preset:viq-test", "config": {"head": head} if head else {}},
        "llm": {
            "path": str(llm_path) if llm_path else None,
            "mode": "lora",
            "lora_r": 4,
            "lora_alpha": 8,
            "lora_dropout": 0.0,
            "max_length": 256,
        },
        "data": {"train": str(data_path), "max_pixels": 64 * 64},
        "optim": {"lr": 3e-3, "warmup_ratio": 0.0, "min_lr_ratio": 1.0},
        "train": {
            "output_dir": str(out),
            "max_steps": 3,
            "batch_size": 2,
            "save_every": 0,
            "progress": False,
            "eval_samples": 2,
        },
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_recipe(
    r: dict, world: int, *, resume: bool = False, stop_after: int | None = None, launcher: str = "torchrun"
) -> list[dict]:
    """Run recipe ``r`` on ``world`` processes (1: in this process; else gloo, started by
    ``launcher``: torchrun, SLURM's variables, or ``--rank`` / ``--world-size`` flags); the history
    kept in its newest checkpoint."""
    out = Path(r["train"]["output_dir"])
    if world == 1:
        train(TrainConfig.from_dict(r), resume=resume, stop_after=stop_after)
        return json.loads((latest_checkpoint(out) / "progress.json").read_text())["history"]
    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}-recipe-{world}.json"
    path.write_text(json.dumps(r))
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "OMPI_"))
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    port = str(free_port())
    args = ["-m", "viq", "train", "--config", str(path)]
    args += (["--resume"] if resume else []) + (["--stop-after", str(stop_after)] if stop_after else [])
    if launcher == "torchrun":
        commands = [
            (
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nproc_per_node",
                    str(world),
                    "--master_port",
                    port,
                    *args,
                ],
                env,
            )
        ]
    elif launcher == "slurm":  # what srun sets on one node
        commands = [
            (
                [sys.executable, *args],
                {
                    **env,
                    "SLURM_PROCID": str(rank),
                    "SLURM_NTASKS": str(world),
                    "SLURM_LOCALID": str(rank),
                    "SLURM_NNODES": "1",
                    "MASTER_PORT": port,
                },
            )
            for rank in range(world)
        ]
    else:
        commands = [
            ([sys.executable, *args, "--rank", str(rank), "--world-size", str(world)], {**env, "MASTER_PORT": port})
            for rank in range(world)
        ]
    logs = [out.parent / f"{out.name}-{launcher}-{i}.log" for i in range(len(commands))]
    procs = []
    for (cmd, e), log in zip(commands, logs):
        with open(log, "w") as f:  # files, not pipes: a full pipe would stall one rank and so all
            procs.append(subprocess.Popen(cmd, env=e, stdout=f, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0] * len(procs), "\n".join(log.read_text()[-3000:] for log in logs)
    return json.loads((latest_checkpoint(out) / "progress.json").read_text())["history"]


def texture(h: int, w: int, seed: int, noise: float = 0.03) -> Image.Image:
    """Smooth colour gradients plus fine noise (standard deviation ``noise`` of the 0-1 range): compressible
    like a photograph, not like white noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * x + c) * np.cos(4 * y - c) for c in rng.uniform(0, 3, 3)], -1) * 0.4 + 0.5
    arr = np.clip(base + rng.normal(0, noise, base.shape), 0, 1)
    return Image.fromarray((arr * 255).round().astype(np.uint8))
