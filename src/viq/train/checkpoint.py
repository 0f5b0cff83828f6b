"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint ``checkpoints/step-<step>/`` holds the model (trainable parts and everything outside
the LLM, unsharded), the optimizer and scheduler state (``state.pt``), every rank's RNG state
(``rng-<rank>.pt``) and the data position and metric history (``progress.json``). It is written to
a hidden temporary directory, fsynced and renamed into place; the pointer file ``latest`` names
the newest complete one, so a run killed mid-write loses at most the steps since the previous
checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from viq._io import atomic_write, fsync_dir
from viq.train.build import build_model
from viq.train.config import TrainConfig
from viq.train.data import BatchStream
from viq.train.model import TrainModel
from viq.train.parallel import Dist, strip_wrapper_prefix

__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint", "full_state", "materialise"]


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model (trainable parts + everything outside the LLM) and optimizer state, on the
    CPU. A collective under FSDP: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=opts)
    trainable = {strip_wrapper_prefix(n) for n, p in model.named_parameters() if p.requires_grad}
    model_state = {k: v for k, v in model_state.items() if not k.startswith("llm.") or k in trainable}
    return model_state, optim_state


def save_checkpoint(directory: Path, step: int, model, optimizer, scheduler, stream: BatchStream,
                    dist_info: Dist, cfg: TrainConfig, history: list[dict]) -> Path:
    """Write checkpoint ``step-<step>`` under ``directory/checkpoints`` and point ``latest`` at it
    (all ranks call this; rank 0 writes the shared files)."""
    model_state, optim_state = full_state(model, optimizer)  # collective under FSDP: all ranks
    ckpts = directory / "checkpoints"
    tmp = ckpts / f".step-{step:08d}.tmp"
    final = ckpts / f"step-{step:08d}"
    if dist_info.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist_info.barrier()
    torch.save(_rng_state(), tmp / f"rng-{dist_info.rank}.pt")
    if dist_info.main:
        torch.save({"model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict()},
                   tmp / "state.pt")
        (tmp / "progress.json").write_text(json.dumps(
            {"step": step, "micro_batch": stream.index, "world": dist_info.world, "recipe": cfg.to_dict(),
             "history": history}, indent=1))
    dist_info.barrier()
    if dist_info.main:
        # The directory is the unit made atomic by the rename: its files and entries reach the disk
        # first, then the rename, then the pointer.
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(ckpts)
        atomic_write(ckpts / "latest", (final.name + "\n").encode())
        old = sorted(p for p in ckpts.glob("step-*") if p.is_dir())
        for p in old[: -cfg.train.keep_checkpoints]:
            shutil.rmtree(p, ignore_errors=True)
    dist_info.barrier()
    return final


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint of the run in ``output_dir`` (None if there is none)."""
    pointer = output_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = output_dir / "checkpoints" / pointer.read_text().strip()
    return path if (path / "state.pt").is_file() else None


def load_checkpoint(path: Path, model, optimizer, scheduler, dist_info: Dist) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from ``path``; returns its
    ``progress.json`` (step, micro_batch, history). The run must have as many processes as the
    one that wrote it (otherwise the data order would change)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    progress = json.loads((path / "progress.json").read_text())
    if progress["world"] != dist_info.world:
        raise ValueError(f"{path}: written by {progress['world']} processes, resuming with {dist_info.world}: "
                         f"the data order would change; resume with the same number of processes")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True, strict=False))
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(torch.load(path / f"rng-{dist_info.rank}.pt", weights_only=False))
    return progress


def materialise(model: TrainModel, state: dict, cfg: TrainConfig) -> TrainModel:
    """A plain (unsharded) model carrying ``state`` (from :func:`full_state`) for export. Under FSDP
    the live model's parameters are shards, so a fresh CPU copy is built; otherwise the live model
    is used directly."""
    if not any(hasattr(p, "full_tensor") for p in model.parameters()):
        return model
    fresh, _ = build_model(cfg, device=torch.device("cpu"))
    fresh.load_state_dict(state, strict=False)
    return fresh
