"""The training loop: one readable loop for every stage, single process or ``torchrun``.

Order of one optimizer step::

    fetch grad_accum micro-batches -> count supervised tokens and images, all-reduced over ranks
    for each micro-batch: forward -> loss = sum_k w_k * loss_sum_k / global_count_k -> backward
    clip -> AdamW step -> LR schedule step -> log (global averages) -> checkpoint every N steps

Normalising each loss sum by the *global* count of the step makes the gradient independent of how
the global batch is split over processes and micro-batches (DDP/FSDP average gradients, so each
rank's loss is scaled by the world size).

Parallelism is applied from outside the model: DDP, or FSDP2 ``fully_shard`` on every transformer
block and the root. Checkpoints (model, optimizer, scheduler, every rank's RNG, data position) are
written to a temporary directory and renamed into place; ``latest`` names the newest complete one, so
a run killed mid-write loses at most the steps since the previous checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from viq.train.build import build_model, save_stage_output
from viq.train.config import TrainConfig
from viq.train.data import Collator, ShardedBatchOrder
from viq.train.model import GROUPS, TrainBatch, TrainModel, default_trainable

log = logging.getLogger(__name__)

__all__ = ["train", "Dist"]

LOSS_KEYS = ("text", "distill", "recon", "commit", "pixel")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup_distributed() -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    info = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        return info, torch.device("cuda", info.local_rank)
    return info, torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def group_of(name: str) -> str:
    for group, prefixes in GROUPS.items():
        if name.startswith(prefixes):
            return group
    raise ValueError(f"parameter {name} belongs to no module group")


def set_trainable(model: TrainModel, groups: list[str]) -> None:
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"optim.trainable: unknown groups {sorted(unknown)}; known: {sorted(GROUPS)}")
    for name, p in model.named_parameters():
        group = group_of(name)
        if group == "llm":
            # prepare_llm decided which LLM parameters train (frozen / LoRA / full)
            p.requires_grad_(p.requires_grad and "llm" in groups)
        else:
            p.requires_grad_(group in groups)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms, biases and other vectors (ndim < 2); per-group LRs."""
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            buckets.setdefault((group_of(_strip(name)), p.ndim >= 2), []).append(p)
    if not buckets:
        raise ValueError("nothing to train: every parameter is frozen (check optim.trainable and llm.mode)")
    param_groups = [
        {"params": params, "lr": cfg.optim.group_lr.get(group, cfg.optim.lr),
         "weight_decay": cfg.optim.weight_decay if decay else 0.0, "name": f"{group}{'' if decay else '.no_decay'}"}
        for (group, decay), params in sorted(buckets.items())
    ]
    return torch.optim.AdamW(param_groups, betas=cfg.optim.betas, eps=cfg.optim.eps)


def _strip(name: str) -> str:
    # Wrappers prefix parameter names (DDP: "module.", torch.compile: "_orig_mod.").
    for prefix in ("module.", "_orig_mod."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def lr_multiplier(step: int, total: int, warmup_ratio: float, min_ratio: float) -> float:
    """Linear warmup from 0 over ceil(warmup_ratio * total) steps, then cosine down to min_ratio."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------- data

def build_dataset(path: str, cfg: TrainConfig, max_pixels: int):
    from viq.data.folder import ImageFolderDataset
    from viq.data.llava import LlavaDataset
    from viq.formats.image import PreprocessConfig

    if cfg.stage == "mllm":
        from viq.data.codes import LlavaCodesDataset

        if not cfg.data.codes:
            raise ValueError("stage mllm needs data.codes: the code store made by viq extract")
        return LlavaCodesDataset(path, cfg.data.codes, image_root=cfg.data.image_root, on_error=cfg.data.on_error)

    pre = PreprocessConfig(min_pixels=cfg.data.min_pixels, max_pixels=max_pixels)
    if Path(path).is_dir():
        return ImageFolderDataset(path, preprocess=pre, on_error=cfg.data.on_error)
    return LlavaDataset(path, image_root=cfg.data.image_root, preprocess=pre, on_error=cfg.data.on_error)


def max_pixels_at(cfg: TrainConfig, step: int) -> int:
    """The progressive-resolution schedule: the max_pixels of the last phase started by ``step``."""
    value = cfg.data.max_pixels
    for start, pixels in sorted(cfg.data.resolution_schedule):
        if step >= start:
            value = pixels
    return value


class BatchStream:
    """Micro-batches for this rank from global micro-batch ``start`` on, rebuilt when the
    progressive-resolution schedule changes the preprocessing."""

    def __init__(self, cfg: TrainConfig, dist_info: Dist, collator: Collator, start: int) -> None:
        self.cfg, self.dist, self.collator = cfg, dist_info, collator
        self.index = start
        self._iter = None
        self._pixels = None

    def next(self, step: int) -> TrainBatch:
        pixels = max_pixels_at(self.cfg, step)
        if self._iter is None or pixels != self._pixels:
            dataset = build_dataset(self.cfg.data.train, self.cfg, pixels)
            order = ShardedBatchOrder(len(dataset), self.cfg.train.batch_size, rank=self.dist.rank,
                                      world=self.dist.world, seed=self.cfg.train.seed, start=self.index)
            # Its own generator: creating a DataLoader iterator draws a seed, which must not consume the
            # global RNG (that would shift dropout noise after a resume).
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=order, collate_fn=self.collator,
                                                 num_workers=self.cfg.data.num_workers,
                                                 generator=torch.Generator().manual_seed(self.cfg.train.seed))
            self._iter, self._pixels = iter(loader), pixels
        self.index += 1
        return next(self._iter)


# ---------------------------------------------------------------------------------- checkpoints

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


def _full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model (trainable parts + everything outside the LLM) and optimizer state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=opts)
    trainable = {_strip(n) for n, p in model.named_parameters() if p.requires_grad}
    model_state = {k: v for k, v in model_state.items() if not k.startswith("llm.") or k in trainable}
    return model_state, optim_state


def save_checkpoint(directory: Path, step: int, model, optimizer, scheduler, stream: BatchStream,
                    dist_info: Dist, cfg: TrainConfig, history: list[dict]) -> Path:
    """Atomically write checkpoint ``step-<step>`` and point ``latest`` at it."""
    model_state, optim_state = _full_state(model, optimizer)  # collective under FSDP: all ranks
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
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = ckpts / ".latest.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, ckpts / "latest")
        old = sorted(p for p in ckpts.glob("step-*") if p.is_dir())
        for p in old[: -cfg.train.keep_checkpoints]:
            shutil.rmtree(p, ignore_errors=True)
    dist_info.barrier()
    return final


def latest_checkpoint(output_dir: Path) -> Path | None:
    pointer = output_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = output_dir / "checkpoints" / pointer.read_text().strip()
    return path if (path / "state.pt").is_file() else None


def load_checkpoint(path: Path, model, optimizer, scheduler, dist_info: Dist) -> dict:
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


# ----------------------------------------------------------------------------------- parallel

def wrap_parallel(model: TrainModel, cfg: TrainConfig, dist_info: Dist, device: torch.device) -> nn.Module:
    if not dist_info.enabled:
        return model
    if cfg.train.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    from torch.distributed.fsdp import fully_shard

    for module in transformer_blocks(model):
        fully_shard(module)
    fully_shard(model)
    return model


def transformer_blocks(model: TrainModel) -> list[nn.Module]:
    """The repeated blocks that FSDP2 shards one by one (encoder, head, decoders, LLM layers)."""
    blocks: list[nn.Module] = list(model.encoder.blocks) if model.encoder is not None else []
    for part in (model.head, model.recon):
        if part is not None:
            blocks += [m for name, m in part.named_children() if name in ("blocks", "code_blocks") for m in m]
    if model.llm is not None:
        for module in model.llm.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                blocks.append(module)
    return blocks


def unwrap(model: nn.Module) -> TrainModel:
    return model.module if hasattr(model, "module") else model


# ----------------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, *, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    """Run a stage. Returns a summary (final losses, output paths).

    Args:
        resume: continue from ``output_dir/checkpoints/latest`` if there is one.
        stop_after: stop (with a checkpoint) after this many steps, without changing the schedule
            (used to test resuming, and to split a run into time-limited jobs).
    """
    dist_info, device = setup_distributed()
    out_dir = Path(cfg.train.output_dir)
    if dist_info.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)  # identical initialisation on every rank
    model, tokenizer = build_model(cfg, device=device)
    set_trainable(model, cfg.optim.trainable or default_trainable(cfg.stage))
    if cfg.train.gradient_checkpointing:
        for part in (model.encoder, model.head, model.recon):
            if part is not None:
                part.gradient_checkpointing = True
        if model.llm is not None:
            # transformers >= 5 renamed gradient_checkpointing_enable (deprecated, removed in v6)
            if hasattr(model.llm, "activation_checkpointing_enable"):
                model.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            elif hasattr(model.llm, "gradient_checkpointing_enable"):
                model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    from viq.model.layers import set_attention_backend

    set_attention_backend(model, cfg.train.attention)
    model.train()
    for helper in (model.teacher, model.vae):
        if helper is not None:
            helper.eval()

    wrapped = wrap_parallel(model, cfg, dist_info, device)
    optimizer = build_optimizer(wrapped, cfg)
    total = cfg.train.max_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total, cfg.optim.warmup_ratio, cfg.optim.min_lr_ratio)
    )
    step, start_micro, history = 0, 0, []
    checkpoint = latest_checkpoint(out_dir) if resume else None
    if checkpoint is not None:
        progress = load_checkpoint(checkpoint, wrapped, optimizer, scheduler, dist_info)
        step, start_micro, history = progress["step"], progress["micro_batch"], progress["history"]
        log.info("resumed from %s at step %d", checkpoint, step)
    else:
        # Different dropout noise per rank, same on every restart of the same rank.
        torch.manual_seed(cfg.train.seed * 7919 + dist_info.rank)

    if cfg.data.train is None:
        raise ValueError("data.train is not set")
    image_tokens = model.projector.num_tokens if model.projector is not None else None
    collator = Collator(tokenizer, cfg.llm.max_length, image_tokens=image_tokens,
                        patch_size=model.config.encoder.patch_size)
    stream = BatchStream(cfg, dist_info, collator, start_micro)
    weights = {"text": cfg.loss.text, "distill": cfg.loss.distill, "recon": cfg.loss.recon,
               "commit": cfg.loss.commit, "pixel": cfg.loss.pixel}
    autocast = _autocast(cfg, device)
    metrics_file = out_dir / "metrics.jsonl"
    tb = _tensorboard(cfg, out_dir) if dist_info.main else None
    usage = CodeUsage(model.config.head.codebook_size if model.head is not None else 0, device)
    bar = _bar(cfg, dist_info, total, step)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    last_end = stop_after if stop_after is not None else total

    while step < min(total, last_end):
        t0 = time.perf_counter()
        micro = [stream.next(step).to(device) for _ in range(cfg.train.grad_accum)]
        if cfg.train.log_samples:
            with open(out_dir / f"samples-rank{dist_info.rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": step + 1, "rank": dist_info.rank, "ids": [i for b in micro for i in b.ids]}) + "\n")
        counts = torch.tensor([sum(b.num_supervised_tokens for b in micro), sum(b.num_images for b in micro),
                               sum(len(b.ids) for b in micro)], dtype=torch.float64, device=device)
        dist_info.all_reduce(counts)
        n_tokens, n_images, n_samples = (max(1.0, float(c)) for c in counts)
        sums = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=device)
        for i, batch in enumerate(micro):
            sync = contextlib.nullcontext() if i == len(micro) - 1 or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
            with sync, autocast:
                out = wrapped(batch)
                parts = {
                    "text": out.get("text_sum", 0) / n_tokens,
                    "distill": out.get("distill_sum", 0) / n_images,
                    "recon": out.get("recon_sum", 0) / n_images,
                    "commit": out.get("commit_sum", 0) / n_images,
                    "pixel": out.get("pixel_sum", 0) / n_images,
                }
                loss = sum(weights[k] * parts[k] for k in LOSS_KEYS if weights[k])
                (loss * dist_info.world).backward()
            sums += torch.tensor([float(torch.as_tensor(parts[k]).detach()) for k in LOSS_KEYS],
                                 dtype=torch.float64, device=device)
            if "indices" in out:
                usage.add(out["indices"])
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1

        dist_info.all_reduce(sums)
        record = {"step": step, "lr": scheduler.get_last_lr()[0]}
        record.update({k: float(v) for k, v in zip(LOSS_KEYS, sums) if weights[k]})
        record["loss"] = sum(weights[k] * record[k] for k in LOSS_KEYS if weights[k])
        record["grad_norm"] = float(grad_norm)
        elapsed = time.perf_counter() - t0
        record["samples_per_s"] = n_samples / elapsed
        record["tokens_per_s"] = n_tokens / elapsed
        if usage.size:
            record.update(usage.summary(dist_info))
        history.append(record)
        if dist_info.main:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")
            if tb is not None:
                for k, v in record.items():
                    if k != "step":
                        tb.add_scalar(f"train/{k}", v, step)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", sps=f"{record['samples_per_s']:.1f}")
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total:
            save_checkpoint(out_dir, step, wrapped, optimizer, scheduler, stream, dist_info, cfg, history)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and cfg.data.val:
            _validate(model, cfg, tokenizer, device, dist_info, step, out_dir, tb)
    bar.close()

    summary: dict[str, Any] = {"steps": step, "history": history, "output_dir": str(out_dir)}
    if step < total:
        save_checkpoint(out_dir, step, wrapped, optimizer, scheduler, stream, dist_info, cfg, history)
        return summary
    # Final: checkpoint, validation, and the stage output in viq format.
    save_checkpoint(out_dir, step, wrapped, optimizer, scheduler, stream, dist_info, cfg, history)
    if cfg.data.val:
        summary["val"] = _validate(model, cfg, tokenizer, device, dist_info, step, out_dir, tb)
    final_state, _ = _full_state(wrapped, optimizer)
    if dist_info.main:
        export_model = _materialise(model, final_state, cfg, device)
        save_stage_output(export_model, out_dir / "final", cfg)
        summary["final"] = str(out_dir / "final")
        log.info("stage %s done: %s", cfg.stage, out_dir / "final")
    dist_info.barrier()
    return summary


def _materialise(model: TrainModel, full_state: dict, cfg: TrainConfig, device) -> TrainModel:
    """A plain (unsharded) copy of the model carrying ``full_state`` for export. Under FSDP the live
    model's parameters are shards; outside it the live model is used directly."""
    if not any(hasattr(p, "full_tensor") for p in model.parameters()):
        return model
    fresh, _ = build_model(cfg, device=torch.device("cpu"))
    fresh.load_state_dict(full_state, strict=False)
    return fresh


def _autocast(cfg: TrainConfig, device: torch.device):
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _tensorboard(cfg: TrainConfig, out_dir: Path):
    if not cfg.train.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("train.tensorboard is set but tensorboard is not installed (pip install tensorboard)")
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def _bar(cfg: TrainConfig, dist_info: Dist, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"train {cfg.stage}", unit="step",
                disable=not (cfg.train.progress and dist_info.main))


class CodeUsage:
    """Code histogram over a window of steps: share of the codebook used and perplexity."""

    def __init__(self, size: int, device: torch.device, window: int = 20) -> None:
        self.size, self.window = size, window
        self.counts: list[torch.Tensor] = []
        self.current = torch.zeros(size, dtype=torch.float64, device=device) if size else None

    def add(self, indices: torch.Tensor) -> None:
        if self.size:
            self.current += torch.bincount(indices.long().flatten(), minlength=self.size).to(self.current)

    def summary(self, dist_info: Dist) -> dict[str, float]:
        dist_info.all_reduce(self.current)
        self.counts = (self.counts + [self.current.clone()])[-self.window:]
        self.current.zero_()
        return usage_stats(torch.stack(self.counts).sum(0))


def usage_stats(hist: torch.Tensor) -> dict[str, float]:
    total = float(hist.sum())
    if total == 0:
        return {"code_usage": 0.0, "code_perplexity": 0.0}
    p = hist[hist > 0] / total
    return {"code_usage": float((hist > 0).sum()) / hist.numel(), "code_perplexity": float(torch.exp(-(p * p.log()).sum()))}


def _validate(model: TrainModel, cfg: TrainConfig, tokenizer, device, dist_info: Dist, step: int,
              out_dir: Path, tb) -> dict[str, float]:
    """Every rank runs the same validation (FSDP needs all ranks in every forward); rank 0 records it."""
    from viq.train.evaluate import evaluate

    result = evaluate(model, cfg, tokenizer, device)
    result["step"] = step
    if dist_info.main:
        with open(out_dir / "val.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        if tb is not None:
            for k, v in result.items():
                if k != "step" and isinstance(v, (int, float)):
                    tb.add_scalar(f"val/{k}", v, step)
    return result
