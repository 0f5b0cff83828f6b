"""Untrusted files (issue 25): a downloaded run folder, weights, code file, config, store or dataset
runs no code, is refused before it allocates what it declares, and fails with one clear line.

Each case builds the crafted file for real (a pickle whose loading would create a marker file, a
``.viq`` whose grid decodes to 268 Mpx, a config 10^7 wide, JSON nested 100 000 deep) and checks: the
marker was never created, the process stayed inside an address-space limit and finished quickly, and
the error is one ``viq: error:`` line naming the file.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from train_helpers import make_llm, make_qa, recipe
from viq._untrusted import LIMITS, UntrustedFileError, restricted_unpickle, torch_load
from viq.cli.main import main

REPO = Path(__file__).resolve().parents[1]
#: The address space a refused file may cost a viq process (torch's import alone maps ~1.5 GB).
MEMORY_LIMIT = 4 << 30


class _Payload:
    """Unpickling this runs ``touch <marker>``: the code a crafted file would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted_pickle(marker: Path) -> bytes:
    return pickle.dumps({"model": _Payload(marker)})


def _crafted_torch_file(path: Path, marker: Path) -> Path:
    """A real torch.save zip whose data.pkl runs the payload under ``weights_only=False``."""
    torch.save({"model": _Payload(marker), "weight": torch.zeros(2)}, path)
    return path


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _viq(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "VIQ_FAULTS", "VIQ_LIMITS")
    }
    env.update(PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "viq", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_limit_memory,
    )
    return proc, time.perf_counter() - start


def _one_clear_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode not in (0, -9), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("viq: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ------------------------------------------------------------------------------- loading runs no code


def test_no_reader_unpickles_freely():
    """The rule in one grep: no ``weights_only=False``, no bare ``pickle.load`` anywhere in viq's
    sources; the only unpickler is the restricted one in viq/_untrusted.py."""
    offenders = []
    for path in (REPO / "src" / "viq").rglob("*.py"):
        text = path.read_text()
        for pattern in (r"weights_only\s*=\s*False", r"\bpickle\.loads?\(", r"\bcloudpickle\b", r"\bdill\b"):
            if re.search(pattern, text) and path.name != "_untrusted.py":
                offenders.append(f"{path.relative_to(REPO)}: {pattern}")
    assert not offenders, offenders


def test_restricted_unpickle_refuses_any_other_global(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(UntrustedFileError, match="posix.system|os.system"):
        restricted_unpickle(_crafted_pickle(marker), tmp_path / ".metadata")
    assert not marker.exists()
    # What torch's checkpoint metadata is made of still loads.
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        TensorProperties,
        TensorStorageMetadata,
    )

    meta = Metadata(
        {
            "w": TensorStorageMetadata(
                TensorProperties(dtype=torch.bfloat16),
                torch.Size([2, 3]),
                [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 3]))],
            )
        }
    )
    again = restricted_unpickle(pickle.dumps(meta), "meta")
    assert again.state_dict_metadata["w"].size == torch.Size([2, 3])
    assert again.state_dict_metadata["w"].properties.dtype == torch.bfloat16


def test_torch_files_are_read_weights_only(tmp_path):
    marker = tmp_path / "ran"
    path = _crafted_torch_file(tmp_path / "model.pth", marker)
    with pytest.raises(UntrustedFileError, match=r"model\.pth: refused"):
        torch_load(path)
    assert not marker.exists()
    # The init readers (timm-siglip:, official .pth) go through it.
    from viq.model.official import _torch_load
    from viq.train.init import _read_state

    with pytest.raises(UntrustedFileError, match="refused"):
        _read_state(path)
    with pytest.raises(UntrustedFileError, match="refused"):
        _torch_load(path)
    assert not marker.exists()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("untrusted")
    return {"data": make_qa(root / "qa", n=8), "llm": make_llm(root / "llm")}


def _run(tmp_path: Path, assets) -> tuple[Path, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    r = recipe(
        "stage2_2",
        tmp_path / "run",
        assets["data"],
        assets["llm"],
        train={"max_steps": 4, "save_every": 2, "keep_checkpoints": 5},
    )
    config = tmp_path / "run.json"
    config.write_text(json.dumps(r))
    assert main(["train", "--config", str(config), "--stop-after", "2"]) == 0
    return config, tmp_path / "run" / "checkpoints" / "step-00000002"


def test_resume_from_a_crafted_checkpoint_runs_no_code(assets, tmp_path):
    """``viq train --resume`` of a downloaded run folder: its DCP ``.metadata`` is a pickle that torch's
    own reader would run; viq refuses it, names it, and does not start over."""
    config, step = _run(tmp_path, assets)
    marker = tmp_path / "ran"
    (step / ".metadata").write_bytes(_crafted_pickle(marker))
    proc, _ = _viq("train", "--config", str(config), "--resume")
    _one_clear_line(proc, "nothing to resume from")
    assert ".metadata: refused" in proc.stderr
    assert not marker.exists()


def test_resume_from_a_crafted_format1_checkpoint_runs_no_code(assets, tmp_path):
    """The earlier checkpoint format (one gathered ``state.pt``) was read with ``weights_only=False``."""
    config, step = _run(tmp_path, assets)
    marker = tmp_path / "ran"
    for f in list(step.iterdir()):
        if f.name not in ("progress.json",):
            f.unlink()
    _crafted_torch_file(step / "state.pt", marker)
    proc, _ = _viq("train", "--config", str(config), "--resume")
    _one_clear_line(proc, "state.pt", "refused")
    assert not marker.exists()


def test_llm_with_a_crafted_pytorch_model_bin(assets, tmp_path):
    from viq.mllm.adapters import load_causal_lm

    llm = tmp_path / "llm"
    shutil.copytree(assets["llm"], llm)
    (llm / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    _crafted_torch_file(llm / "pytorch_model.bin", marker)
    with pytest.raises(UntrustedFileError, match="llm"):
        load_causal_lm(llm)
    assert not marker.exists()


# --------------------------------------------------------------------- sizes checked before allocating


def test_decode_bomb_is_refused_before_decoding(model_dir, tmp_path):
    """A 6 MB ``.viq`` whose grid decodes to 268 Mpx: refused from its header, in seconds, in bounded
    memory; ``--max-pixels`` raises (or lowers) the limit."""
    from viq.formats.codes import Codes

    levels = tuple(json.loads((model_dir / "config.json").read_text())["head"]["levels"])
    bomb = Codes(torch.zeros(1024, 1024, 4, dtype=torch.int32), levels, patch_size=16)
    path = bomb.save(tmp_path / "bomb.viq")
    assert path.stat().st_size < 9 << 20  # 4 Mi codes of at most 16 bits
    proc, seconds = _viq("decode", str(model_dir), str(path), "-o", str(tmp_path / "out"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "bomb.viq" in proc.stderr and "268,435,456 pixels" in proc.stderr and "--max-pixels" in proc.stderr
    assert seconds < 60 and not list((tmp_path / "out").glob("*.png"))
    # A small file under a lowered limit is refused the same way (the flag is honoured).
    small = Codes(torch.zeros(4, 4, 4, dtype=torch.int32), levels, patch_size=16).save(tmp_path / "s.viq")
    assert main(["decode", str(model_dir), str(small), "-o", str(tmp_path / "o2"), "--max-pixels", "1000", "-q"]) == 1
    assert main(["decode", str(model_dir), str(small), "-o", str(tmp_path / "o3"), "-q"]) == 0


@pytest.mark.parametrize(
    "change", [{"width": 10**7}, {"depth": 10**5}, {"width": 16384, "num_heads": 16, "depth": 1000}]
)
def test_absurd_model_config_is_refused_before_building(model_dir, tmp_path, change):
    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["encoder"].update(change)
    (bad / "config.json").write_text(json.dumps(config))
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    proc, seconds = _viq("encode", str(bad), str(image), "-o", str(tmp_path / "codes"))
    _one_clear_line(proc, "config.json")
    assert seconds < 60


def test_absurd_llm_config_is_refused_before_building(assets, tmp_path):
    from viq.mllm.adapters import load_causal_lm

    llm = tmp_path / "llm"
    shutil.copytree(assets["llm"], llm)
    config = json.loads((llm / "config.json").read_text())
    config["hidden_size"] = 10**7
    (llm / "config.json").write_text(json.dumps(config))
    with pytest.raises(UntrustedFileError, match=r"config\.json: hidden_size 10000000"):
        load_causal_lm(llm)


# ------------------------------------------------------------------------------------- deep JSON


DEEP = "[" * 100_000 + "]" * 100_000


def test_deep_json_in_a_data_file_is_a_skippable_record_error(tmp_path):
    from viq.data.records import DataError, iter_json_list, iter_jsonl

    good = json.dumps({"id": "a", "conversations": []})
    path = tmp_path / "d.jsonl"
    moderately_deep = "[" * 70 + "1" + "]" * 70  # parses, but deeper than the 64 levels a record may have
    path.write_text(good + "\n" + DEEP + "\n" + moderately_deep + "\n" + good + "\n")
    values = list(iter_jsonl(str(path)))
    assert [type(v).__name__ for _, v in values] == ["dict", "DataError", "DataError", "dict"]
    assert "d.jsonl:2: record nested deeper than" in str(values[1][1])
    listed = tmp_path / "d.json"
    listed.write_text("[" + good + "," + DEEP + "]")
    with pytest.raises(DataError, match="d.json:1: JSON nested too deeply"):
        list(iter_json_list(str(listed)))


def test_long_lines_are_refused_without_reading_them_whole(tmp_path, monkeypatch):
    from viq.data.records import DataError, iter_jsonl

    monkeypatch.setattr(LIMITS, "max_json_line_bytes", 1000)
    good = json.dumps({"id": "a", "conversations": []})
    path = tmp_path / "d.jsonl"
    path.write_text(good + "\n" + json.dumps({"id": "b", "text": "x" * 5000}) + "\n" + good + "\n")
    values = list(iter_jsonl(str(path)))
    assert [type(v).__name__ for _, v in values] == ["dict", "DataError", "dict"]
    assert [n for n, _ in values] == [1, 2, 3] and "longer than 1000" in str(values[1][1])
    assert isinstance(values[1][1], DataError)


def test_deep_json_in_codes_config_and_store_is_one_line(model_dir, tmp_path):
    import zlib

    from viq.formats import codes as codes_format
    from viq.formats.codes import Codes, CodesFormatError

    codes = Codes(torch.zeros(2, 2, 4, dtype=torch.int32), (8, 8, 8, 5, 5, 5), patch_size=16)
    meta = ('{"x":' + DEEP + "}").encode()
    header = codes_format._HEADER.pack(
        codes_format.MAGIC,
        codes_format.FORMAT_VERSION,
        0,
        len(codes.levels),
        codes.bits_per_code,
        4,
        16,
        2,
        2,
        0,
        0,
        len(meta),
    )
    body = (
        header
        + bytes(codes.levels)
        + meta
        + codes_format.pack_bits(codes.indices.numpy().reshape(-1), codes.bits_per_code)
    )
    crafted = body + zlib.crc32(body).to_bytes(4, "little")  # a valid checksum: the crafted case
    path = tmp_path / "deep.viq"
    path.write_bytes(bytes(crafted))
    with pytest.raises(CodesFormatError, match="deep.viq"):
        Codes.load(path)
    proc, _ = _viq("info", str(path))
    _one_clear_line(proc, "deep.viq")
    # A model directory whose config.json is deep.
    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    (bad / "config.json").write_text(DEEP)
    proc, _ = _viq("info", str(bad))
    _one_clear_line(proc, "config.json")
    # A store whose store.json is deep.
    store = tmp_path / "store"
    store.mkdir()
    (store / "store.json").write_text(DEEP)
    proc, _ = _viq("store", "stats", str(store))
    _one_clear_line(proc, "store.json")


# --------------------------------------------------------------------------------- a real full disk


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 64 MiB tmpfs (needs root: skipped elsewhere, with the reason)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if (
        shutil.which("mount") is None
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True
        ).returncode
    ):
        pytest.skip("needs permission to mount a tmpfs (run as root) for the real full-disk cases")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(mount: Path, leave: int) -> Path:
    """A ballast file that leaves ``leave`` bytes free on ``mount``."""
    ballast = mount / "ballast"
    free = shutil.disk_usage(mount).free
    with open(ballast, "wb") as f:
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        todo = max(0, free - leave)
        while todo > 0:
            todo -= f.write(chunk[: min(len(chunk), todo)])
    return ballast


def test_a_real_full_disk_under_the_checkpoint_writer(small_tmpfs):
    """torch's checkpoint writer on a really full file system raises a RuntimeError from its zip writer
    ("unexpected pos"), not an OSError; viq's writer reports it as ENOSPC naming the folder."""
    import torch.distributed.checkpoint as dcp

    from viq._io import writing

    _fill(small_tmpfs, 256 << 10)
    target = small_tmpfs / "ckpt"
    with pytest.raises(OSError) as info:
        with writing(target):
            dcp.save({"w": torch.zeros(1 << 20)}, checkpoint_id=target, no_dist=True)
    assert info.value.errno == 28 and info.value.filename == str(target)


def test_training_on_a_full_disk_stops_in_one_line_then_resumes(assets, tmp_path, small_tmpfs):
    """``viq train`` whose second checkpoint does not fit on a real tmpfs: one ``viq: error:`` line
    naming the checkpoint folder; the first checkpoint is intact; with space freed, ``--resume``
    finishes the run."""
    _, step = _run(tmp_path / "probe", assets)
    size = sum(f.stat().st_size for f in step.rglob("*") if f.is_file())
    r = recipe(
        "stage2_2",
        small_tmpfs / "run",
        assets["data"],
        assets["llm"],
        train={"max_steps": 4, "save_every": 2, "keep_checkpoints": 5},
    )
    config = tmp_path / "full.json"
    config.write_text(json.dumps(r))
    ballast = _fill(small_tmpfs, int(1.5 * size) + (256 << 10))  # room for one checkpoint, not two
    proc, _ = _viq("train", "--config", str(config), timeout=300)
    line = _one_clear_line(proc, "No space left on device")
    assert "step-00000004" in line, line
    ckpts = small_tmpfs / "run" / "checkpoints"
    assert (ckpts / "step-00000002" / "progress.json").is_file() and not list(ckpts.glob(".step-*"))
    ballast.unlink()
    again, _ = _viq("train", "--config", str(config), "--resume", timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (small_tmpfs / "run" / "final" / "stage.json").is_file()


# ----------------------------------------------------------------------------------------- symlinks


def test_writes_never_follow_a_planted_symlink(assets, tmp_path):
    """A run folder whose ``.train.lock`` is a symlink to a file of the user's: the training refuses it
    (one line naming the lock) and the file it points to is untouched; logs are appended the same way."""
    from viq._io import append_line

    victim = tmp_path / "precious.txt"
    victim.write_text("precious\n")
    r = recipe("stage2_2", tmp_path / "run", assets["data"], assets["llm"], train={"max_steps": 1})
    config = tmp_path / "run.json"
    config.write_text(json.dumps(r))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".train.lock").symlink_to(victim)
    proc, _ = _viq("train", "--config", str(config))
    _one_clear_line(proc, ".train.lock")
    assert victim.read_text() == "precious\n"
    link = tmp_path / "errors-rank0.jsonl"
    link.symlink_to(victim)
    with pytest.raises(OSError):
        append_line(link, '{"id": "b$(touch x).png"}')
    assert victim.read_text() == "precious\n"


def test_names_from_inputs_are_escaped_in_log_lines():
    from viq._untrusted import printable

    assert printable("cat.png") == "cat.png"
    forged = printable("a.png\nviq: error: everything is fine\x1b[2J")
    assert "\n" not in forged and "\x1b" not in forged and "\\n" in forged


def test_viq_limits_environment_variable(tmp_path):
    """``VIQ_LIMITS`` as docs/security.md writes it raises a limit in a new process; unknown names are
    an error."""
    from viq._untrusted import _limits_from_environment

    limits = _limits_from_environment("max_decode_pixels=1e9,max_json_depth=128")
    assert limits.max_decode_pixels == 10**9 and limits.max_json_depth == 128
    with pytest.raises(ValueError, match="unknown limit 'max_pixels'"):
        _limits_from_environment("max_pixels=3")
    env = {**os.environ, "VIQ_LIMITS": "max_decode_pixels=1e9,max_json_depth=128"}
    out = subprocess.run(
        [sys.executable, "-c", "from viq._untrusted import LIMITS; print(LIMITS.max_decode_pixels)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.strip() == "1000000000", out.stderr


def test_archive_member_bomb_is_refused_from_its_header(tmp_path):
    """A .tar.gz shard of ~300 KB whose one member inflates to 300 MB: refused from the member's declared
    size, before anything is read into memory."""
    import io
    import tarfile

    from viq.data.shards import iter_samples

    shard = tmp_path / "bomb.tar.gz"
    size = 300 << 20

    class Zeros(io.RawIOBase):
        def __init__(self) -> None:
            self.left = size

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            n = min(len(buffer), self.left)
            buffer[:n] = bytes(n)
            self.left -= n
            return n

    with tarfile.open(shard, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("000.jpg")
        info.size = size
        tar.addfile(info, io.BufferedReader(Zeros()))
    assert shard.stat().st_size < 2 << 20
    start = time.perf_counter()
    with pytest.raises(tarfile.TarError, match="000.jpg declares 314572800 bytes"):
        list(iter_samples(shard))
    assert time.perf_counter() - start < 10


def test_store_whose_levels_imply_billions_of_codes(tmp_path):
    """A store.json whose levels make a 2.1e9-code codebook: `viq store stats` refuses before it
    allocates a histogram of that size (15.9 GiB), in one line, inside the address-space limit."""
    from viq.store import CodeStore

    store = CodeStore.create(tmp_path / "st", levels=(8, 8, 4, 3, 3), model_fingerprint="0123456789abcdef")
    rng = np.random.default_rng(0)
    from viq.formats.codes import Codes

    with store.writer(name="w") as w:
        for i in range(3):
            w.add(
                f"img{i}", Codes(torch.from_numpy(rng.integers(0, 2304, (2, 2, 4)).astype(np.int32)), (8, 8, 4, 3, 3))
            )
    config = json.loads((tmp_path / "st" / "store.json").read_text())
    config.update(levels=[255, 255, 255, 129], codebook_size=255**3 * 129, bits_per_code=31)
    (tmp_path / "st" / "store.json").write_text(json.dumps(config))
    proc, seconds = _viq("store", "stats", str(tmp_path / "st"))
    _one_clear_line(proc, "store.json")
    assert seconds < 60


def test_a_record_declaring_too_many_codes_is_refused_before_decoding():
    from viq.store.shard import decode_record

    start = time.perf_counter()
    with pytest.raises(ValueError, match="declares 875000000 codes"):
        decode_record(b"\x01" + bytes(100), 875_000_000, 14, 15360, True)
    assert time.perf_counter() - start < 1


def test_extract_on_a_full_disk_stops_in_one_line_then_resumes(model_dir, tmp_path, small_tmpfs):
    """`viq extract` into a store on a really full tmpfs: one `viq: error:` line naming a path and the
    full disk, nothing half-written left as data; with space freed, the same command completes and the
    store verifies."""
    from test_extract import make_images
    from viq.store import CodeStore

    make_images(tmp_path / "imgs", 12, bad=False)
    args = (
        "extract",
        str(model_dir),
        str(tmp_path / "imgs"),
        "-o",
        str(small_tmpfs / "store"),
        "--workers",
        "0",
        "--flush-every",
        "3",
        "-q",
        "--device",
        "cpu",
    )
    ballast = _fill(small_tmpfs, 8 << 10)
    proc, _ = _viq(*args)
    line = _one_clear_line(proc, "No space left on device")
    assert str(small_tmpfs) in line, line
    ballast.unlink()
    again, _ = _viq(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    store = CodeStore.open(small_tmpfs / "store")
    assert len(store) == 12 and store.verify().ok


def test_a_huge_conversation_is_refused_before_tokenising():
    """An 8 MB turn costs seconds and gigabytes to tokenise only to be refused for length: its characters
    are checked against llm.max_length first."""
    from types import SimpleNamespace

    from viq.train.data import MAX_CHARS_PER_TOKEN, Collator

    class NeverCalled:
        def encode(self, messages):
            raise AssertionError("tokenised")

    collate = Collator(NeverCalled(), max_length=4096)
    item = SimpleNamespace(
        messages=(("user", "<image>\n" + "x" * (8 << 20)), ("assistant", "a")),
        images=[],
        codes=[],
        where="train.jsonl:7",
        id="x",
    )
    with pytest.raises(
        ValueError, match=r"train.jsonl:7 \(id=x\): 8388617 characters of text cannot fit llm.max_length=4096"
    ):
        collate([item])
    assert MAX_CHARS_PER_TOKEN * 4096 < 8 << 20
