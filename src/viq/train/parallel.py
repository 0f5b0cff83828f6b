"""Processes and parallel wrapping: the process group, DDP / FSDP2 around the training model.

Parallelism is applied from outside the model: DDP, or FSDP2 ``fully_shard`` on every transformer
block and then the root, so the model code never knows how it is run.

Who this process is comes from :mod:`viq.launch`: flags (``viq train --rank R --world-size W``), else
``torchrun``, SLURM (``srun``) or OpenMPI (``mpirun``), else one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.distributed as dist
from torch import nn

from viq.launch import DistEnv, export_torch_env, resolve_distributed
from viq.train.config import TrainConfig
from viq.train.model import TrainModel

__all__ = ["Dist", "setup_distributed", "wrap_parallel", "transformer_blocks", "unwrap", "strip_wrapper_prefix"]


@dataclass
class Dist:
    """This process's place in the run: ``rank`` of ``world`` processes, GPU ``local_rank``."""

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
        """Sum ``t`` over all processes, in place (a no-op in a single process)."""
        if self.enabled:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup_distributed(launch: DistEnv | None = None) -> tuple[Dist, torch.device]:
    """Join the run's process group when it has more than one process; this process's device: its
    local GPU, else the CPU (gloo).

    ``launch``: this process's rank, world size and local rank (e.g. from ``--rank`` /
    ``--world-size``); default: from the launcher (:func:`viq.launch.resolve_distributed`). The
    rendezvous is ``MASTER_ADDR`` / ``MASTER_PORT`` as the launcher sets them, else SLURM's first
    node, else this machine (:func:`viq.launch.export_torch_env`)."""
    env = launch if launch is not None else resolve_distributed()
    if env.world_size > 1 and not dist.is_initialized():
        export_torch_env(env)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    info = Dist(env.rank, env.world_size, env.local_rank)
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        return info, torch.device("cuda", info.local_rank)
    return info, torch.device("cpu")


def wrap_parallel(model: TrainModel, cfg: TrainConfig, dist_info: Dist, device: torch.device) -> nn.Module:
    """``model`` as run under ``cfg.train.parallel`` (ddp | fsdp); unchanged in a single process."""
    if not dist_info.enabled:
        return model
    if cfg.train.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6: FSDP2 lived under the composable API
        from torch.distributed._composable.fsdp import fully_shard

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
    """The :class:`TrainModel` inside a DDP wrapper (FSDP2 shards in place: the model itself)."""
    return cast(TrainModel, model.module if hasattr(model, "module") else model)


def strip_wrapper_prefix(name: str) -> str:
    """A parameter name without the prefixes wrappers add (DDP: ``module.``, torch.compile:
    ``_orig_mod.``): the name in the plain :class:`TrainModel`."""
    for prefix in ("module.", "_orig_mod."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name
