"""Checkpoints: everything a run needs to continue exactly where it stopped, on any number of processes.

A checkpoint ``checkpoints/step-<step>/`` holds

* the model (trainable parts and everything outside the LLM) and the optimizer state as a
  ``torch.distributed.checkpoint`` (DCP) directory — ``.metadata`` and one ``__<rank>_0.distcp`` per
  process, each rank writing its own FSDP2 shards (DDP's replicated tensors once, nothing gathered).
  Loading reshards: a run saved on N processes resumes on M, under DDP, FSDP2 or in one process;
* ``scheduler.pt``: the LR schedule;
* ``progress.json``: step, data position, metric history, world size and the recipe.

It is written to a hidden temporary directory, fsynced and renamed into place (an existing checkpoint
of the same step is set aside until the new one is in place); the pointer file ``latest`` names the
newest complete one, so a run killed mid-write loses at most the steps since the previous checkpoint.
``--resume`` checks a checkpoint before using it (:func:`check_checkpoint`: every file present, none
shorter than its metadata says) and falls back to the newest one that passes, naming the others in a
warning; a run with checkpoints or metrics but no usable checkpoint stops (:func:`resume_point`).

No RNG state is stored: every optimizer step begins by seeding Python, NumPy and torch from
``(seed, step, rank)`` (:func:`seed_step`), so what a step draws never depends on how the run got
there.

What a resume reproduces. On the same number of processes: everything, bit for bit. On M ≠ N
processes with the same global batch (processes × ``batch_size`` × ``grad_accum``, checked): the
model, optimizer and schedule bit for bit, and the samples of every step (the data position is the
step: step s reads positions [s·G, (s+1)·G) of the epoch's permutation however they are dealt to
ranks — past the first epoch as long as both layouts use the same number of samples per epoch,
``floor(ceil(size / world) / batch_size) × batch_size × world``, e.g. whenever the dataset size is
a multiple of world × batch_size for both). What differs is what differs between any N- and
M-process run: the order of floating-point sums in the gradient all-reduce, and which rank's random
stream (dropout) a sample meets.

Checkpoints of the earlier format (one gathered ``state.pt`` and per-rank RNG files) still load, on
any number of processes; their RNG files are not used.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from viq._faults import fault_point
from viq._io import atomic_write, fsync_tree, recover_dir, remove_tree, replace_dir, writing
from viq._untrusted import UntrustedFileError, read_json, restricted_unpickle, torch_load
from viq.train.build import build_model
from viq.train.config import TrainConfig
from viq.train.data import BatchStream
from viq.train.model import TrainModel
from viq.train.parallel import Dist, strip_wrapper_prefix

log = logging.getLogger(__name__)

__all__ = [
    "save_checkpoint",
    "latest_checkpoint",
    "resume_point",
    "run_started",
    "check_checkpoint",
    "load_checkpoint",
    "seed_step",
    "full_state",
    "materialise",
]

#: progress.json "format": 2 = DCP directory + scheduler.pt; 1 (no field) = gathered state.pt (read only)
FORMAT = 2


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU) for the optimizer step that follows ``step``
    completed steps on ``rank``: a pure function of the three, so a resumed run draws what an
    uninterrupted one of the same world size draws, with no RNG state in the checkpoint."""
    words = np.random.SeedSequence([seed % 2**64, step, rank]).generate_state(3)
    value = int(words[0]) << 32 | int(words[1])
    random.seed(value)
    np.random.seed(int(words[2]))
    torch.manual_seed(value)


@contextmanager
def _single_process_quiet():
    """DCP without a process group reads and writes in one process, as meant here; it says so each time."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _kept(model: nn.Module, model_state: dict) -> dict:
    """The entries a checkpoint holds: everything but the frozen LLM base."""
    trainable = {strip_wrapper_prefix(n) for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model_state.items() if not k.startswith("llm.") or k in trainable}


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model (trainable parts + everything outside the LLM) and optimizer state, on the
    CPU (on rank 0; other ranks get empty dicts under FSDP). A collective under FSDP: every rank
    must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=opts)
    return _kept(model, model_state), optim_state


def save_checkpoint(
    directory: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    stream: BatchStream,
    dist_info: Dist,
    cfg: TrainConfig,
    history: list[dict],
    extra: dict | None = None,
) -> Path:
    """Write checkpoint ``step-<step>`` under ``directory/checkpoints`` and point ``latest`` at it.
    A collective: every rank calls it and writes its own shards; rank 0 writes the shared files.
    ``extra``: small state that is the same on every rank (e.g. the code-usage window), saved by
    rank 0 as ``extra.pt`` and read back with :func:`load_extra`.

    Complete or absent: everything goes to a hidden temporary directory, is fsynced, and only then
    takes the checkpoint's place (:func:`viq._io.replace_dir`: an existing checkpoint of the same step
    is set aside, never deleted before the new one is in place), then ``latest`` is rewritten
    atomically. A failed write (a full disk) removes the temporary directory and raises an ``OSError``
    naming it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    # Sharded as the model runs (FSDP2: each rank's DTensor shards; DDP / one process: plain tensors).
    model_state, optim_state = get_state_dict(model, optimizer)
    ckpts = directory / "checkpoints"
    tmp = ckpts / f".step-{step:08d}.tmp"
    final = ckpts / f"step-{step:08d}"
    try:
        with writing(tmp):
            if dist_info.main:
                remove_tree(tmp)
                tmp.mkdir(parents=True)
            dist_info.barrier()
            # Every rank fsyncs the files it wrote; rank 0 writes .metadata once all have written.
            with _single_process_quiet():
                dcp.save({"model": _kept(model, model_state), "optimizer": optim_state}, checkpoint_id=tmp)
            if dist_info.main:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                if extra is not None:
                    torch.save(extra, tmp / "extra.pt")
                fault_point("checkpoint.write")
                (tmp / "progress.json").write_text(
                    json.dumps(
                        {
                            "format": FORMAT,
                            "step": step,
                            "micro_batch": stream.index,
                            "world": dist_info.world,
                            "recipe": cfg.to_dict(),
                            "history": history,
                        },
                        indent=1,
                    )
                )
            dist_info.barrier()
            if dist_info.main:
                # The directory is the unit made atomic by the rename: its files and entries reach the disk
                # first, then the rename, then the pointer.
                fsync_tree(tmp)
                fault_point("checkpoint.written")
                replace_dir(tmp, final, before_swap=lambda: fault_point("checkpoint.swap"))
                fault_point("checkpoint.renamed")
                atomic_write(ckpts / "latest", (final.name + "\n").encode())
                old = sorted(p for p in ckpts.glob("step-*") if p.is_dir())
                for p in old[: -cfg.train.keep_checkpoints]:
                    remove_tree(p)
    except BaseException:
        if dist_info.main:
            remove_tree(tmp)
        raise
    dist_info.barrier()
    return final


def _reader(path: Path):
    """A DCP reader of ``path`` that never runs code from it: torch's own reader unpickles ``.metadata``
    with plain ``pickle.load``; this one builds only checkpoint-metadata classes
    (:func:`viq._untrusted.restricted_unpickle`)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            name = ".metadata" if rank is None else f"__{rank}.metadata"
            metadata = restricted_unpickle((Path(path) / name).read_bytes(), Path(path) / name)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _planner():
    """DCP's default load planner, except that non-tensor entries (optimizer hyper-parameters: numbers,
    strings, lists) are read with ``torch.load(weights_only=True)``; torch's own unpickles them with no restriction."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            try:
                loaded = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                raise UntrustedFileError(
                    f"checkpoint entry {read_item.dest_index.fqn}: refused: it pickles more than "
                    f"tensors and plain values ({str(e).splitlines()[0][:120]})"
                ) from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafePlanner()


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def check_checkpoint(path: Path) -> str | None:
    """Why the checkpoint directory ``path`` cannot be resumed from (None: it can): a missing or
    unreadable file, one shorter than its metadata says (a truncated shard), a step that does not match
    its name. Reads the small files and the DCP metadata, never the shards themselves."""
    if not path.is_dir():
        return "missing"
    progress = path / "progress.json"
    try:
        info = read_json(progress)
        step = int(info["step"])
    except FileNotFoundError:
        return f"{progress.name} is missing (the checkpoint was not completely written)"
    except UntrustedFileError as e:
        return str(e)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f"{progress} is unreadable ({type(e).__name__}: {str(e)[:80]})"
    if step != _step_of(path):
        return f"{progress} says step {step}, the folder is {path.name}"
    if (path / "state.pt").is_file():  # format 1
        return None
    try:
        metadata = _reader(path).read_metadata()
    except UntrustedFileError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - any failure to read it makes the checkpoint unusable
        return f"{path / '.metadata'} is unreadable ({type(e).__name__}: {str(e)[:80]})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size < size:
            return f"{f} is truncated ({f.stat().st_size} of at least {size} bytes)"
    for name in ("scheduler.pt", "extra.pt"):
        f = path / name
        if name == "extra.pt" and not f.is_file():
            continue
        try:
            torch_load(f)
        except UntrustedFileError as e:
            return str(e)
        except Exception as e:  # noqa: BLE001
            return f"{f} is unreadable ({type(e).__name__}: {str(e)[:80]})"
    return None


def load_extra(path: Path) -> dict:
    """The ``extra`` state a checkpoint was saved with ({} for checkpoints without one)."""
    f = Path(path) / "extra.pt"
    return torch_load(f) if f.is_file() else {}


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint of the run in ``output_dir``: the one ``latest`` names, else the
    newest that passes :func:`check_checkpoint` (a warning names each one skipped and why); None if
    there is none. A replacement interrupted between its renames is finished first."""
    ckpts = output_dir / "checkpoints"
    if not ckpts.is_dir():
        return None
    for aside in ckpts.glob(".step-*.old"):
        if recover_dir(ckpts / aside.name[1 : -len(".old")]):
            log.warning("%s: put back the checkpoint set aside by an interrupted save", aside)
    pointer = ckpts / "latest"
    named = None
    try:
        text = pointer.read_text().strip()
        named = ckpts / text if text else None
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    candidates = sorted((p for p in ckpts.glob("step-*") if p.is_dir()), key=_step_of, reverse=True)
    if named is not None and named in candidates:
        candidates = [named] + [p for p in candidates if p != named]
    elif pointer.exists():
        log.warning(
            "%s names %r, which is not a checkpoint; looking for the newest complete one",
            pointer,
            text if named is not None else "",
        )
    for path in candidates:
        problem = check_checkpoint(path)
        if problem is None:
            return path
        log.warning("checkpoint %s cannot be resumed from: %s; trying the one before", path, problem)
    return None


def run_started(output_dir: Path) -> bool:
    """Whether a run has trained into ``output_dir``: it holds a checkpoint folder or metrics."""
    ckpts = output_dir / "checkpoints"
    metrics = output_dir / "metrics.jsonl"
    return (ckpts.is_dir() and any(ckpts.glob("step-*"))) or (metrics.is_file() and metrics.stat().st_size > 0)


def resume_point(output_dir: Path) -> Path | None:
    """The checkpoint ``--resume`` continues from: :func:`latest_checkpoint`, or None for a run that
    has not started (:func:`run_started`). A run that has written checkpoints or metrics but left no
    usable checkpoint is an error naming the folder -- never a silent restart from step 0."""
    found = latest_checkpoint(output_dir)
    if found is not None:
        return found
    if run_started(output_dir):
        written = sorted(p.name for p in (output_dir / "checkpoints").glob("step-*"))
        what = (
            f"checkpoints {', '.join(written)} are unusable (see the warnings)"
            if written
            else "it has metrics.jsonl but no checkpoint"
        )
        raise ValueError(
            f"{output_dir}: nothing to resume from: {what}; refusing to start again from step 0 "
            f"over it (remove the folder, or set another train.output_dir)"
        )
    return None


def _check_layout(path: Path, progress: dict, cfg: TrainConfig, dist_info: Dist) -> None:
    """Same global batch as the run that wrote ``path`` (the data position and the schedule are
    counted in steps); a different number of processes is fine."""
    saved = progress["recipe"]["train"]
    b, a = saved["batch_size"], saved.get("grad_accum", 1)
    before = progress["world"] * b * a
    now = dist_info.world * cfg.train.batch_size * cfg.train.grad_accum
    if before != now:
        raise ValueError(
            f"{path}: written with a global batch of {before} samples per step ({progress['world']} processes × "
            f"train.batch_size {b} × train.grad_accum {a}), this run has {now} ({dist_info.world} × "
            f"{cfg.train.batch_size} × {cfg.train.grad_accum}); set train.batch_size and train.grad_accum so that "
            f"processes × batch_size × grad_accum = {before} to resume exactly"
        )
    if progress["world"] != dist_info.world:
        log.info("resharding %s: written by %d processes, resuming on %d", path, progress["world"], dist_info.world)


def load_checkpoint(path: Path, model, optimizer, scheduler, dist_info: Dist, cfg: TrainConfig) -> dict:
    """Restore model, optimizer and scheduler from ``path`` on this run's processes (any number,
    resharding as needed; a collective: every rank calls it). Returns its ``progress.json`` (step,
    history, ...) with ``micro_batch``, this rank's next micro-batch index, for this run's layout."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    progress = read_json(path / "progress.json")
    _check_layout(path, progress, cfg, dist_info)
    if (path / "state.pt").is_file():  # format 1: the gathered state, read by every rank
        state = torch_load(path / "state.pt")  # tensors and plain values only: a pickled object is refused
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
        scheduler.load_state_dict(state["scheduler"])
    else:
        model_state, optim_state = _load_sharded(path, model, optimizer)
        set_state_dict(
            model,
            optimizer,
            model_state_dict=model_state,
            optim_state_dict=optim_state,
            options=StateDictOptions(strict=False),
        )
        scheduler.load_state_dict(torch_load(path / "scheduler.pt"))
    # Each step reads grad_accum micro-batches on every rank: the position follows from the step.
    progress["micro_batch"] = progress["step"] * cfg.train.grad_accum
    return progress


def _load_sharded(path: Path, model, optimizer) -> tuple[dict, dict]:
    """The DCP checkpoint at ``path`` read into state dicts laid out (sharded) like this run's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    # The templates: this run's own state, sharded as it runs; DCP fills them in place. An optimizer
    # that has not stepped gets zero moments for every parameter here, but the checkpoint has none
    # for parameters that never had a gradient, and those must stay without state.
    model_state, optim_state = get_state_dict(model, optimizer)
    model_state = _kept(model, model_state)
    saved = set(_reader(path).read_metadata().state_dict_metadata)
    missing = sorted(k for k in model_state if f"model.{k}" not in saved)
    if missing:
        raise ValueError(
            f"{path}: has no {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
            f"({len(missing)} entries): the recipe trains other parts than the run that wrote it"
        )
    per_param = {}
    for fqn, values in optim_state["state"].items():
        values = {k: v for k, v in values.items() if f"optimizer.state.{fqn}.{k}" in saved}
        if values:
            per_param[fqn] = values
    optim_state["state"] = per_param
    state = {"model": model_state, "optimizer": optim_state}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=path, storage_reader=_reader(path), planner=_planner())
    return cast(dict, state["model"]), cast(dict, state["optimizer"])


def materialise(model: TrainModel, state: dict, cfg: TrainConfig) -> TrainModel:
    """A plain (unsharded) model carrying ``state`` (from :func:`full_state`) for export. Under FSDP
    the live model's parameters are shards, so a fresh CPU copy is built; otherwise the live model
    is used directly."""
    if not any(hasattr(p, "full_tensor") for p in model.parameters()):
        return model
    fresh, _ = build_model(cfg, device=torch.device("cpu"))
    fresh.load_state_dict(state, strict=False)
    return fresh
