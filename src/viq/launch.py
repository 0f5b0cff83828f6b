"""Which process am I? Rank, world size and local rank from flags or from the launcher.

The same command runs under ``torchrun``, SLURM ``srun``, OpenMPI ``mpirun`` or alone;
:func:`resolve_distributed` reads the launcher's variables in a fixed order of precedence:

1. explicit arguments (``viq extract --rank R --world-size W``): ``"flags"``;
2. ``torchrun`` (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``): ``"torchrun"``;
3. SLURM (``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``): ``"slurm"``;
4. OpenMPI (``OMPI_COMM_WORLD_RANK`` / ``OMPI_COMM_WORLD_SIZE`` / ``OMPI_COMM_WORLD_LOCAL_RANK``): ``"openmpi"``;
5. otherwise one process: ``"single"``.

Only these launcher variables are read (they describe the process, they do not change behaviour).
:func:`export_torch_env` then writes the ``torchrun`` variables (and ``MASTER_ADDR`` / ``MASTER_PORT``
defaults) so that ``torch.distributed.init_process_group("env://")`` works under any launcher.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

__all__ = ["DistEnv", "resolve_distributed", "export_torch_env", "first_host", "DEFAULT_MASTER_PORT"]

#: ``MASTER_PORT`` when neither the caller nor the environment gives one (torchrun's default).
DEFAULT_MASTER_PORT = 29500

#: (source, rank variable, world size variable, local rank variable), in order of precedence.
_LAUNCHERS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a job: ``rank`` of ``world_size`` (``0 <= rank < world_size``),
    ``local_rank`` on its node (which accelerator it uses), and where the values came from
    (``"flags"``, ``"torchrun"``, ``"slurm"``, ``"openmpi"`` or ``"single"``)."""

    rank: int
    world_size: int
    local_rank: int
    source: str


def _int(value: object, what: str, source: str) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{source}: {what} must be an integer, got {value!r}") from None
    return number


def _checked(rank: int, world: int, local: int, source: str, names: tuple[str, str, str]) -> DistEnv:
    r, w, lr = names
    if world < 1:
        raise ValueError(f"{source}: {w}={world}, the world size must be at least 1")
    if not 0 <= rank < world:
        raise ValueError(f"{source}: {r}={rank} is not a rank of a world of {w}={world} (expected 0..{world - 1})")
    if not 0 <= local < world:
        raise ValueError(f"{source}: {lr}={local} is not a valid local rank in a world of {w}={world}")
    return DistEnv(rank, world, local, source)


def resolve_distributed(
    rank: int | None = None,
    world_size: int | None = None,
    local_rank: int | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> DistEnv:
    """This process's rank, world size and local rank (precedence: module docstring).

    Flags win when ``rank`` or ``world_size`` is given; then both must be (``local_rank`` defaults
    to the launcher's, else 0). A launcher counts when its rank and world-size variables are both
    set; its local rank defaults to 0.

    Raises:
        ValueError: a value that is not an integer, a rank outside ``0..world_size-1``, a world size
            below 1, or only one of ``rank`` / ``world_size`` given.
    """
    env = os.environ if environ is None else environ
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError(f"flags: give both --rank and --world-size (got rank={rank}, world_size={world_size})")
        if local_rank is None:
            detected = resolve_distributed(environ=env)
            local_rank = detected.local_rank if detected.source != "single" else 0
        return _checked(
            _int(rank, "rank", "flags"),
            _int(world_size, "world size", "flags"),
            _int(local_rank, "local rank", "flags"),
            "flags",
            ("--rank", "--world-size", "--local-rank"),
        )
    for source, r, w, lr in _LAUNCHERS:
        if r in env and w in env:
            local = local_rank if local_rank is not None else env.get(lr, "0")
            return _checked(
                _int(env[r], r, source), _int(env[w], w, source), _int(local, lr, source), source, (r, w, lr)
            )
    return _checked(
        0,
        1,
        0 if local_rank is None else _int(local_rank, "local rank", "flags"),
        "single",
        ("rank", "world size", "local rank"),
    )


_NODELIST_GROUP = re.compile(r"^([^\[,]*)(?:\[([^\]]*)\])?")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[003-005,9]"`` -> ``"gpu003"``, ``"a1,b2"`` -> ``"a1"``.

    Handles the common compressed syntax (a prefix with one bracketed list of numbers and zero-padded
    ranges); only the first host is needed, so only the first group is expanded.

    Raises:
        ValueError: an empty or malformed list.
    """
    text = nodelist.strip()
    m = _NODELIST_GROUP.match(text)
    if not text or m is None or not m.group(1) and m.group(2) is None:
        raise ValueError(f"cannot read a host name from the SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0].strip()
    if not first.isdigit():
        raise ValueError(f"cannot read a host name from the SLURM node list {nodelist!r}: bad range {ranges!r}")
    return prefix + first


def _several_nodes(source: str, environ: Mapping[str, str]) -> bool:
    """Whether the launcher says the job spans several nodes (then 127.0.0.1 cannot be the master)."""
    if source == "slurm":
        return environ.get("SLURM_NNODES", environ.get("SLURM_JOB_NUM_NODES", "1")).strip() != "1"
    if source == "openmpi":
        return environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") != environ.get("OMPI_COMM_WORLD_SIZE")
    return False


def export_torch_env(
    env: DistEnv,
    master_addr: str | None = None,
    master_port: int | None = None,
    *,
    environ: MutableMapping[str, str] | None = None,
) -> dict[str, str]:
    """Write ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (from ``env``) and ``MASTER_ADDR``,
    ``MASTER_PORT`` into the environment, so that ``init_process_group("env://")`` works.

    ``MASTER_ADDR``: the argument, else the environment's, else (SLURM) the first host of
    ``SLURM_JOB_NODELIST`` / ``SLURM_NODELIST``, else ``127.0.0.1`` unless the launcher says the job
    spans several nodes.
    ``MASTER_PORT``: the argument, else the environment's, else :data:`DEFAULT_MASTER_PORT`.
    Returns the values written.

    Raises:
        ValueError: a multi-process job whose master address cannot be found (give ``master_addr``).
    """
    target = os.environ if environ is None else environ
    addr = master_addr or target.get("MASTER_ADDR")
    if not addr and env.source == "slurm":
        nodelist = target.get("SLURM_JOB_NODELIST") or target.get("SLURM_NODELIST")
        if nodelist:
            addr = first_host(nodelist)
    if not addr:
        if env.world_size > 1 and _several_nodes(env.source, target):
            raise ValueError(
                f"{env.source}: {env.world_size} processes on several nodes and no MASTER_ADDR; "
                "pass master_addr (the first node's host name)"
            )
        addr = "127.0.0.1"
    port = master_port if master_port is not None else target.get("MASTER_PORT", str(DEFAULT_MASTER_PORT))
    values = {
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "MASTER_ADDR": str(addr),
        "MASTER_PORT": str(_int(port, "MASTER_PORT", env.source)),
    }
    target.update(values)
    return values
