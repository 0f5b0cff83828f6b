"""Launching extraction on several processes: rank and world size from --rank/--world-size, torchrun's
or SLURM's variables; each rank opens only its own shards and every id is stored exactly once.
Plus the precedence and error messages of :func:`viq.launch.resolve_distributed`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_extract import make_images, store_content
from test_extract_shards import OpenLog, write_shards
from viq.cli.main import main as cli_main
from viq.extract import DONE_FILE, extract
from viq.launch import DistEnv, export_torch_env, first_host, resolve_distributed
from viq.store.reader import CodeStore

SHARDS = [f"shard-{i:05d}.tar" for i in range(8)]
#: every launcher variable resolve_distributed reads, cleared so the host's environment cannot leak in
LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
)

# Runs `viq extract` with tarfile.open recorded: one line per opened file into $VIQ_TEST_OPEN_LOG.
_SPY = """
import os, runpy, sys, tarfile
real = tarfile.open
def spy(name=None, *a, **k):
    with open(os.environ["VIQ_TEST_OPEN_LOG"], "a") as f:
        f.write(os.path.basename(str(name)) + "\\n")
    return real(name, *a, **k)
tarfile.open = spy
sys.argv = ["viq", *sys.argv[1:]]
runpy.run_module("viq", run_name="__main__")
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 tar shards of 2 images each, and the store of a single-process extraction of them."""
    root = tmp_path_factory.mktemp("shards")
    images = make_images(root / "imgs", 16, seed=11, bad=False)
    write_shards(root / "shards", images, 2, sidecars=False)
    return root / "shards"


@pytest.fixture(scope="module")
def reference(model_dir, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "store"
    extract(model_dir, shards, out, num_workers=0, progress=False)
    return store_content(out)


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_VARS + ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _done(store: Path, rank: int) -> list[str]:
    return [json.loads(line)["unit"] for line in (store / DONE_FILE.format(rank=rank)).read_text().splitlines()]


def _check_two_ranks(store: Path, opened: dict[int, list[str]], reference: dict) -> None:
    """Rank r opened exactly shards r, r+2, ... once each; the store holds every id once, as one process would."""
    for rank in (0, 1):
        assert sorted(opened[rank]) == SHARDS[rank::2]
        assert sorted(_done(store, rank)) == SHARDS[rank::2]
    s = CodeStore.open(store)
    assert s.verify().ok
    ids = s.ids()
    assert len(ids) == len(set(ids)) == 16
    assert store_content(store) == reference


def test_two_processes_with_rank_flags(model_dir, shards, reference, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs, logs = [], {}
    for rank in (0, 1):  # both ranks at once, as two independent processes
        logs[rank] = tmp_path / f"opened-{rank}.txt"
        cmd = [
            sys.executable,
            "-c",
            _SPY,
            "extract",
            "--model",
            str(model_dir),
            "--input",
            str(shards / "shard-{00000..00007}.tar"),
            "--out",
            str(tmp_path / "store"),
            "--workers",
            "0",
            "-q",
            "--rank",
            str(rank),
            "--world-size",
            "2",
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                env={**env, "VIQ_TEST_OPEN_LOG": str(logs[rank])},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1])["images"] == 8
    opened = {rank: logs[rank].read_text().split() for rank in (0, 1)}
    _check_two_ranks(tmp_path / "store", opened, reference)


@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_two_ranks_from_launcher_variables(launcher, model_dir, shards, reference, tmp_path, clean_env):
    """Each rank runs with the variables its launcher would set (torchrun: RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT; srun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID) and no flags."""
    opened = {}
    for rank in (0, 1):
        if launcher == "torchrun":
            variables = {
                "RANK": rank,
                "WORLD_SIZE": 2,
                "LOCAL_RANK": rank,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": 29511,
            }
        else:
            variables = {"SLURM_PROCID": rank, "SLURM_NTASKS": 2, "SLURM_LOCALID": rank, "SLURM_NNODES": 1}
        for name, value in variables.items():
            clean_env.setenv(name, str(value))
        assert resolve_distributed() == DistEnv(rank, 2, rank, launcher)
        log = OpenLog(clean_env)
        counts = extract(model_dir, shards, tmp_path / "store", num_workers=0, progress=False)
        assert counts["images"] == counts["encoded"] == 8
        opened[rank] = log.names()
    _check_two_ranks(tmp_path / "store", opened, reference)


def test_rank_flags_errors_from_the_cli(model_dir, shards, tmp_path, clean_env, caplog):
    base = ["extract", "--model", str(model_dir), "--input", str(shards), "--out", str(tmp_path / "s"), "-q"]
    assert cli_main([*base, "--rank", "2", "--world-size", "2"]) != 0
    assert "--rank=2 is not a rank of a world of --world-size=2 (expected 0..1)" in caplog.text
    assert cli_main([*base, "--rank", "1"]) != 0
    assert "give both --rank and --world-size" in caplog.text
    assert not (tmp_path / "s").exists()  # refused before anything is created


# -- resolve_distributed: precedence and errors ------------------------------------------------

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "2"}
OMPI = {"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "32", "OMPI_COMM_WORLD_LOCAL_RANK": "3"}


def test_precedence_flags_torchrun_slurm_openmpi_single():
    every = {**TORCHRUN, **SLURM, **OMPI}
    assert resolve_distributed(1, 4, environ=every) == DistEnv(1, 4, 1, "flags")  # local rank: the launcher's
    assert resolve_distributed(1, 4, 0, environ=every) == DistEnv(1, 4, 0, "flags")
    assert resolve_distributed(environ=every) == DistEnv(3, 8, 1, "torchrun")
    assert resolve_distributed(environ={**SLURM, **OMPI}) == DistEnv(5, 16, 2, "slurm")
    assert resolve_distributed(environ=OMPI) == DistEnv(6, 32, 3, "openmpi")
    assert resolve_distributed(environ={}) == DistEnv(0, 1, 0, "single")
    assert resolve_distributed(1, 2, environ={}) == DistEnv(1, 2, 0, "flags")


def test_a_launcher_needs_both_rank_and_world_size():
    # RANK alone (no WORLD_SIZE) is not torchrun: SLURM's complete pair wins
    assert resolve_distributed(environ={"RANK": "1", **SLURM}) == DistEnv(5, 16, 2, "slurm")
    assert resolve_distributed(environ={"SLURM_PROCID": "1"}) == DistEnv(0, 1, 0, "single")
    assert resolve_distributed(environ={"RANK": "1", "WORLD_SIZE": "2"}).local_rank == 0  # default local rank


@pytest.mark.parametrize(
    "kwargs, environ, message",
    [
        (
            {"rank": 2, "world_size": 2},
            {},
            r"flags: --rank=2 is not a rank of a world of --world-size=2 \(expected 0..1\)",
        ),
        ({"rank": -1, "world_size": 2}, {}, r"--rank=-1 is not a rank"),
        ({"rank": 0, "world_size": 0}, {}, r"--world-size=0, the world size must be at least 1"),
        ({"rank": 1}, {}, r"give both --rank and --world-size \(got rank=1, world_size=None\)"),
        ({"world_size": 4}, TORCHRUN, r"give both --rank and --world-size \(got rank=None, world_size=4\)"),
        ({}, {"RANK": "8", "WORLD_SIZE": "8"}, r"torchrun: RANK=8 is not a rank of a world of WORLD_SIZE=8"),
        ({}, {"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, r"slurm: SLURM_PROCID must be an integer, got 'x'"),
        (
            {},
            {**OMPI, "OMPI_COMM_WORLD_LOCAL_RANK": "32"},
            r"openmpi: OMPI_COMM_WORLD_LOCAL_RANK=32 is not a valid local",
        ),
    ],
)
def test_inconsistent_inputs_are_errors(kwargs, environ, message):
    with pytest.raises(ValueError, match=message):
        resolve_distributed(**kwargs, environ=environ)


def test_export_torch_env_and_slurm_master():
    env: dict[str, str] = {"SLURM_JOB_NODELIST": "gpu[003-005,9]", "SLURM_NNODES": "3"}
    values = export_torch_env(DistEnv(4, 24, 0, "slurm"), environ=env)
    assert values == {
        "RANK": "4",
        "WORLD_SIZE": "24",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "gpu003",
        "MASTER_PORT": "29500",
    }
    assert env["MASTER_ADDR"] == "gpu003"
    with pytest.raises(ValueError, match="no MASTER_ADDR"):
        export_torch_env(DistEnv(1, 16, 1, "slurm"), environ={"SLURM_NNODES": "2"})
    assert export_torch_env(DistEnv(0, 1, 0, "single"), environ={})["MASTER_ADDR"] == "127.0.0.1"
    assert first_host("a1,b2") == "a1"
