"""The training loop: one readable loop for every stage, single process or ``torchrun``.

Order of one optimizer step (:func:`train_step`)::

    count supervised tokens and images of the step's micro-batches, all-reduced over ranks
    for each micro-batch: forward -> loss = sum_k w_k * loss_sum_k / global_count_k -> backward
    clip -> AdamW step -> LR schedule step

and around it (:func:`train`): fetch ``grad_accum`` micro-batches -> :func:`train_step` -> log
(global averages) -> checkpoint every N steps -> validate every M steps.

Normalising each loss sum by the *global* count of the step makes the gradient independent of how
the global batch is split over processes and micro-batches (DDP/FSDP average gradients, so each
rank's loss is scaled by the world size).

The pieces live next door: processes and wrapping in :mod:`.parallel`, what trains and the schedule
in :mod:`.optim`, data in :mod:`.data`, checkpoints in :mod:`.checkpoint`, measures in
:mod:`.metrics`, the run's log in :mod:`.logger`, validation in :mod:`.evaluate`, per-stage behaviour
in :mod:`.stages`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from viq._io import LockHeld, OwnerLock, append_line, writing
from viq._progress import progress_bar
from viq.launch import DistEnv
from viq.model.layers import set_attention_backend
from viq.train.build import build_model
from viq.train.checkpoint import (
    full_state,
    load_checkpoint,
    load_extra,
    materialise,
    resume_point,
    run_started,
    save_checkpoint,
    seed_step,
)
from viq.train.config import TrainConfig
from viq.train.data import BatchStream, Collator, build_dataset, dataset_images, max_pixels_at, spread_indices
from viq.train.evaluate import evaluate
from viq.train.fsq_init import pca_init
from viq.train.head_warmup import warm_up_head
from viq.train.logger import RunLogger, learning_rates
from viq.train.losses import LOSS_TABLE, loss_names
from viq.train.metrics import CodeUsage
from viq.train.model import StepLosses, TrainBatch, TrainModel
from viq.train.optim import build_optimizer, build_scheduler, set_trainable
from viq.train.output import save_stage_output
from viq.train.parallel import Dist, setup_distributed, wrap_parallel

log = logging.getLogger(__name__)

#: held by rank 0 of the job that trains into an output folder
RUN_LOCK = ".train.lock"

__all__ = [
    "train",
    "train_step",
    "prepare_model",
    "combine_losses",
    "loss_weights",
    "autocast_context",
    "enable_gradient_checkpointing",
]


def loss_weights(cfg: TrainConfig) -> dict[str, float]:
    """The recipe's weight of each loss (0: off), keyed by the loss table's names (:mod:`viq.train.losses`)."""
    return cfg.loss_weights()


def combine_losses(
    out: StepLosses, weights: dict[str, float], n_tokens: float, n_images: float
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The step loss of one micro-batch: ``sum_k w_k * sum_k / count_k`` over the losses the model
    computed, where the count is the step's global number of the loss's unit (``Loss.unit`` in
    :mod:`viq.train.losses`: supervised tokens for text, images for the rest). Returns the loss and every
    normalised part (0 where the model computed none)."""
    counts = {"tokens": n_tokens, "images": n_images}
    parts = {k: out.sums[k] / counts[loss.unit] if k in out.sums else 0 for k, loss in LOSS_TABLE.items()}
    loss = sum(weights[k] * parts[k] for k in LOSS_TABLE if weights[k] and k in out.sums)
    return cast(torch.Tensor, loss), parts  # a tensor: every stage computes at least one weighted loss


def autocast_context(cfg: TrainConfig, device: torch.device):
    """The forward's precision: bf16 autocast (fp32 master weights) or plain fp32; ``auto`` is bf16
    on CUDA, fp32 elsewhere."""
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    model: nn.Module,
    batch: TrainBatch | Sequence[TrainBatch],
    optimizer: torch.optim.Optimizer,
    scheduler,
    cfg: TrainConfig,
    *,
    dist_info: Dist | None = None,
    device: torch.device | None = None,
    autocast=None,
    usage: CodeUsage | None = None,
) -> dict[str, float]:
    """One optimizer step over ``batch``: this rank's micro-batches of the step (a TrainBatch, or
    ``grad_accum`` of them), already on ``device``.

    Forward and backward of each micro-batch (gradients synchronised on the last one only),
    gradient clipping at ``optim.grad_clip`` (0: none), optimizer step, zeroed gradients, scheduler
    step. ``model`` is the model as run (a TrainModel, or its DDP / FSDP form); every rank calls
    this. ``usage``, if given, counts the step's codes.

    Returns floats, global over ranks: each weighted loss (mean per supervised token or per image),
    ``loss`` (their weighted sum), ``grad_norm`` (before clipping) and the step's ``tokens``,
    ``images`` and ``samples`` (each at least 1).
    """
    micro = [batch] if isinstance(batch, TrainBatch) else list(batch)
    dist_info = dist_info or Dist()
    device = device if device is not None else next(model.parameters()).device
    autocast = autocast if autocast is not None else autocast_context(cfg, device)
    weights = loss_weights(cfg)
    counts = torch.tensor(
        [sum(b.num_supervised_tokens for b in micro), sum(b.num_images for b in micro), sum(len(b.ids) for b in micro)],
        dtype=torch.float64,
        device=device,
    )
    dist_info.all_reduce(counts)
    n_tokens, n_images, n_samples = (max(1.0, float(c)) for c in counts)
    # The step's loss parts stay on the device until the step is done: reading each one back (float())
    # would make the host wait for the device once per loss and micro-batch.
    names = loss_names()
    sums = torch.zeros(len(names), dtype=torch.float64, device=device)
    for i, b in enumerate(micro):
        # Gradients are all-reduced once per step, on the last micro-batch.
        sync = contextlib.nullcontext() if i == len(micro) - 1 or not hasattr(model, "no_sync") else model.no_sync()
        with sync, autocast:
            out = model(b)
            loss, parts = combine_losses(out, weights, n_tokens, n_images)
            (loss * dist_info.world).backward()
        sums += torch.stack([torch.as_tensor(parts[k], device=device).detach().to(torch.float64) for k in names])
        if usage is not None and out.indices is not None:
            usage.add(out.indices)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(
        trainable, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    )
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()

    dist_info.all_reduce(sums)
    values = torch.cat([sums, grad_norm.detach().to(torch.float64).reshape(1)]).tolist()  # one read-back a step
    result = {k: v for k, v in zip(names, values) if weights[k]}
    result["loss"] = sum(weights[k] * result[k] for k in names if weights[k])
    result["grad_norm"] = values[-1]
    result.update(tokens=n_tokens, images=n_images, samples=n_samples)
    return result


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_model(model: TrainModel, cfg: TrainConfig) -> None:
    """Trainable groups, activation checkpointing, attention backend, train/eval modes."""
    set_trainable(model, cfg.trainable_groups)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    set_attention_backend(model, cfg.train.attention)
    model.train()
    for helper in (model.teacher, model.vae):
        if helper is not None:
            helper.eval()


def enable_gradient_checkpointing(model: TrainModel) -> list[str]:
    """Recompute the activations of every block stack in the backward pass instead of keeping them:
    the ViQ parts that have blocks (encoder trunk, code head, latent decoders: each module with a
    ``gradient_checkpointing`` switch) and the LLM's decoder layers. Returns the parts switched on (also
    logged). An LLM that cannot checkpoint is an error naming its class, never silently skipped; the
    parts without blocks (MAP pool, dequantiser, projector) keep their few activations."""
    switched = []
    for name, module in model.named_modules():
        if name and not name.startswith("llm.") and isinstance(getattr(module, "gradient_checkpointing", None), bool):
            module.gradient_checkpointing = True
            switched.append(name)
    if model.llm is not None:
        llm = model.llm
        # transformers >= 5 renamed gradient_checkpointing_enable (deprecated, removed in v6)
        if hasattr(llm, "activation_checkpointing_enable"):
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(llm, "gradient_checkpointing_enable"):
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            raise ValueError(
                f"train.gradient_checkpointing: the LLM ({type(llm).__name__}) has no activation "
                f"checkpointing; set train.gradient_checkpointing=false"
            )
        base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
        flag = (
            "is_activation_checkpointing"
            if hasattr(base, "is_activation_checkpointing")
            else "is_gradient_checkpointing"
        )
        if not getattr(base, flag, True):
            raise ValueError(
                f"train.gradient_checkpointing: the LLM ({type(base).__name__}) did not switch "
                f"checkpointing on; set train.gradient_checkpointing=false"
            )
        switched.append("llm")
    log.info("gradient checkpointing: %s", ", ".join(switched) or "no part has blocks to checkpoint")
    return switched


def train(
    cfg: TrainConfig, *, resume: bool = False, stop_after: int | None = None, launch: DistEnv | None = None
) -> dict[str, Any]:
    """Run a stage. Returns a summary (final losses, output paths).

    Args:
        resume: continue from ``output_dir/checkpoints/latest`` if there is one (written by any
            number of processes, see :mod:`viq.train.checkpoint`).
        stop_after: stop (with a checkpoint) after this many steps, without changing the schedule
            (used to test resuming, and to split a run into time-limited jobs).
        launch: this process's rank and world size (default: from torchrun, SLURM or OpenMPI; see
            :func:`viq.train.parallel.setup_distributed`).
    """
    dist_info, device = setup_distributed(launch)
    out_dir = Path(cfg.train.output_dir)
    if cfg.data.train is None:
        raise ValueError("data.train is not set")
    owner = None
    if dist_info.main:
        with writing(out_dir):
            out_dir.mkdir(parents=True, exist_ok=True)
        owner = _own_run_folder(out_dir)
    try:
        return _train(cfg, dist_info, device, out_dir, resume=resume, stop_after=stop_after)
    finally:
        if owner is not None:
            owner.release()


def _own_run_folder(out_dir: Path):
    """One training job per output folder (rank 0 holds ``.train.lock`` for the whole run)."""

    try:
        return OwnerLock(out_dir / RUN_LOCK)
    except LockHeld as e:
        raise ValueError(
            f"{out_dir}: another training job is using this output folder ({e.holder}); two jobs "
            f"would overwrite each other's checkpoints: wait for it, or set another "
            f"train.output_dir"
        ) from None


def _starting_point(out_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to continue from; an error for a fresh start over an existing run (its
    checkpoints would mix with the new run's) or a resume with nothing usable to resume from."""
    if resume:
        return resume_point(out_dir)
    if run_started(out_dir):
        raise ValueError(
            f"{out_dir}: holds a run already (checkpoints / metrics.jsonl): continue it with "
            f"--resume, or remove the folder / set another train.output_dir to start afresh"
        )
    return None


def _start_images(train_data: Any, cfg: TrainConfig, pca: bool, warmup: bool) -> list[torch.Tensor]:
    """The training images the fresh code head starts from (``model.fsq_init: pca`` and the head
    warm-up), decoded once for both: as many as the larger of the two asks for."""
    wanted = [n for used, n in ((pca, cfg.model.fsq_init_images), (warmup, cfg.model.head_warmup_images)) if used]
    return dataset_images(train_data, max(wanted)) if wanted else []


def _spread(pool: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """``count`` items spread evenly over ``pool`` (all of it when it holds no more): the pool is in
    dataset order, so its head alone would be the dataset's head."""
    return pool if len(pool) <= count else [pool[i] for i in spread_indices(len(pool), count)]


def _train(
    cfg: TrainConfig, dist_info: Dist, device: torch.device, out_dir: Path, *, resume: bool, stop_after: int | None
) -> dict[str, Any]:
    checkpoint = _starting_point(out_dir, resume)
    # The data before the model: a missing file or a bad image stops the run now, not when drawn.
    first_pixels = max_pixels_at(cfg, 0)
    train_data = build_dataset(cfg.data.train, cfg, first_pixels, progress=cfg.train.progress and dist_info.main)
    if cfg.data.val:
        build_dataset(cfg.data.val, cfg, first_pixels, progress=cfg.train.progress and dist_info.main)
    seed_everything(cfg.train.seed)  # identical initialisation on every rank
    model, tokenizer = build_model(cfg, device=device)
    # A resumed run has its trained projection and head: neither start runs again.
    fresh_pca = checkpoint is None and cfg.model.fsq_init == "pca"
    fresh_warmup = checkpoint is None and cfg.model.head_warmup_steps > 0
    pool = _start_images(train_data, cfg, fresh_pca, fresh_warmup)
    if fresh_pca:
        measured = pca_init(model, _spread(pool, cfg.model.fsq_init_images))
        log.info(
            "model.fsq_init: pca on %d images (%d code positions): the %d FSQ inputs keep %.1f %% of the "
            "variance of their %d-wide input",
            measured.images,
            measured.vectors,
            len(measured.variances),
            100 * measured.explained,
            measured.input_dim,
        )
    if fresh_warmup:
        warmed = warm_up_head(
            model,
            _spread(pool, cfg.model.head_warmup_images),
            steps=cfg.model.head_warmup_steps,
            lr=cfg.model.head_warmup_lr,
            batch_size=cfg.train.batch_size,
            seed=cfg.train.seed,
            autocast=autocast_context(cfg, device),
        )
        log.info(
            "model.head_warmup_steps: %d steps on the code head and dequantiser alone, feature error "
            "(MSE over the trunk features' variance) %.3f -> %.3f, %.1f s",
            warmed.steps,
            warmed.first_error,
            warmed.last_error,
            warmed.seconds,
        )
    if dist_info.enabled and (cfg.model.head_warmup_steps or cfg.model.fsq_init != "random"):
        # Every rank computed the same from the same images; rank 0's copy makes it exact.
        for module in (model.head, model.dequant):
            for tensor in module.parameters() if module is not None else ():
                torch.distributed.broadcast(tensor.data, src=0)
    prepare_model(model, cfg)

    wrapped = wrap_parallel(model, cfg, dist_info, device)
    optimizer = build_optimizer(wrapped, cfg)
    total = cfg.train.max_steps
    scheduler = build_scheduler(optimizer, cfg)
    step, start_micro, history = 0, 0, []
    if checkpoint is not None:
        progress = load_checkpoint(checkpoint, wrapped, optimizer, scheduler, dist_info, cfg)
        step, start_micro, history = progress["step"], progress["micro_batch"], progress["history"]
        log.info("resumed from %s at step %d", checkpoint, step)

    image_tokens = model.projector.num_tokens if model.projector is not None else None
    collator = Collator(
        tokenizer, cfg.llm.max_length, image_tokens=image_tokens, patch_size=model.config.encoder.patch_size
    )
    stream = BatchStream(cfg, dist_info, collator, start_micro, built=(first_pixels, train_data))
    autocast = autocast_context(cfg, device)
    run_log = RunLogger(out_dir, cfg, main=dist_info.main, start_step=step)  # drops records after `step`
    clock = time.perf_counter() - (history[-1].get("time", 0.0) if history else 0.0)  # run time, resumes included
    usage = CodeUsage(
        model.config.head.codebook_size if model.head is not None else 0,
        device,
        collapse_usage=cfg.train.collapse_usage,
    )
    saved_usage = load_extra(checkpoint).get("code_usage") if checkpoint is not None else None
    if saved_usage is not None:
        usage.load_state_dict(saved_usage)
    bar = progress_bar(
        total, f"train {cfg.stage}", unit="step", initial=step, show=cfg.train.progress and dist_info.main
    )
    last_end = stop_after if stop_after is not None else total

    def validate() -> dict[str, float]:
        # Every rank runs the same validation (FSDP needs all ranks in every forward); rank 0 records it.
        shown: list = []  # (image, reconstruction) pairs, for the log
        result = evaluate(model, cfg, tokenizer, device, reconstructions=shown if dist_info.main else None)
        result["step"] = step
        run_log.log_eval(result, step, shown)
        return result

    def save() -> None:
        """The run's state at ``step`` (model, optimizer, schedule, data position, history, code usage)."""
        save_checkpoint(
            out_dir,
            step,
            wrapped,
            optimizer,
            scheduler,
            stream,
            dist_info,
            cfg,
            history,
            extra={"code_usage": usage.state_dict()},
        )

    while step < min(total, last_end):
        t0 = time.perf_counter()
        # Random noise (dropout) per rank and step, a function of (seed, step, rank) only: a resumed run
        # draws what an uninterrupted one draws, with no RNG state in the checkpoint.
        seed_step(cfg.train.seed, step, dist_info.rank)
        micro = [stream.next(step).to(device) for _ in range(cfg.train.grad_accum)]
        if cfg.train.log_samples:
            append_line(
                out_dir / f"samples-rank{dist_info.rank}.jsonl",
                json.dumps({"step": step + 1, "rank": dist_info.rank, "ids": [i for b in micro for i in b.ids]}),
            )
        lrs = learning_rates(optimizer)  # the rates this step uses
        stats = train_step(
            wrapped,
            micro,
            optimizer,
            scheduler,
            cfg,
            dist_info=dist_info,
            device=device,
            autocast=autocast,
            usage=usage,
        )
        step += 1

        # Every step goes into the history (kept in checkpoints); the log writes every log_every steps.
        elapsed = time.perf_counter() - t0
        record = {"step": step, "lr": lrs}
        record.update({k: v for k, v in stats.items() if k not in ("tokens", "images", "samples")})
        record["samples_per_s"] = stats["samples"] / elapsed
        if model.llm is not None:
            record["tokens_per_s"] = stats["tokens"] / elapsed
        record.update(step_time=elapsed, time=time.perf_counter() - clock)
        if usage.size:
            record.update(usage.summary(dist_info))
            warning = usage.collapse(step, record)
            if warning and dist_info.main:
                log.warning("%s", warning)
        history.append(record)
        run_log.log_step(history)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", sps=f"{record['samples_per_s']:.1f}")
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total:
            save()
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total and cfg.data.val:
            validate()
    bar.close()

    summary: dict[str, Any] = {"steps": step, "history": history, "output_dir": str(out_dir)}
    save()
    if step < total:
        run_log.close()
        return summary
    # Final: validation, and the stage output in viq format.
    if cfg.data.val:
        summary["val"] = validate()
    run_log.close()
    final_state, _ = full_state(wrapped, optimizer)
    if dist_info.main:
        save_stage_output(materialise(model, final_state, cfg), out_dir / "final", cfg)
        summary["final"] = str(out_dir / "final")
        log.info("stage %s done: %s", cfg.stage, out_dir / "final")
    dist_info.barrier()
    return summary
