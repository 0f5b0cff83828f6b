"""Tests for the compact memory-mapped index of the code store (viq.store.index, issue 10 item 3)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import viq.store.ids as store_ids
from viq.data.codes import CodeDataset
from viq.formats.codes import Codes
from viq.store import CodeStore, StoreError
from viq.store.index import (
    INDEX_DIR,
    INDEX_SUFFIX,
    LOOKUP_SUFFIX,
    IndexFile,
    StoreIndex,
)

LEVELS = (8, 8, 4, 3, 3)
FP = "0123456789abcdef"
REPO = Path(__file__).resolve().parents[1]


def _codes(rng: np.random.Generator) -> Codes:
    h, w = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    size = (h * 16 - int(rng.integers(0, 16)), w * 16) if rng.integers(0, 2) else None
    return Codes(rng.integers(0, 2304, (h, w, 4)), LEVELS, image_size=size)


def _ids(n: int, prefix: str = "") -> list[str]:
    # Mixed shapes: tar members, paths, non-ASCII, different lengths.
    out = []
    for i in range(n):
        kind = i % 4
        out.append(
            f"{prefix}shard-{i // 50:05d}.tar/{i:06d}.jpg"
            if kind == 0
            else f"{prefix}images/sub{i % 7}/img_{i}.png"
            if kind == 1
            else f"{prefix}photos/été/{i}.jpeg"
            if kind == 2
            else f"{prefix}{i}"
        )
    return out


def _fill(path: Path, writers: dict[str, list[str]], seed: int = 0, shard_bytes: int = 600) -> dict[str, tuple]:
    """Write ``writers`` (name -> ids) into the store at ``path``; returns id -> (codes, hash, source)."""
    rng = np.random.default_rng(seed)
    store = CodeStore.create(path, levels=LEVELS, model_fingerprint=FP, shard_bytes=shard_bytes)
    data = {}
    for name, ids in writers.items():
        with store.writer(name=name) as w:
            for sid in ids:
                c = _codes(rng)
                digest = f"{int(rng.integers(0, 2**62)):064x}" if rng.integers(0, 3) else ""
                src = f"/data/{sid}" if rng.integers(0, 2) else ""
                w.add(sid, c, content_hash=digest, source=src)
                data.setdefault(sid, (c, digest, src))
    return data


def _check_all(st: CodeStore, data: dict[str, tuple]) -> None:
    assert len(st) == len(data)
    for sid, (c, digest, src) in data.items():
        assert sid in st
        got = st[sid]
        assert got.same_codes(c) and got.image_size == c.image_size
        e = st.entry(sid)
        assert e.sample_id == sid and e.content_hash == digest and e.source == src and e.grid == c.grid
        if digest:
            assert st.has_hash(digest) is not None
    for miss in ("", "nope", "shard-00000.tar/000000.jpg ", "images/sub1/img_1.PNG", "x" * 300):
        if miss not in data:
            assert miss not in st
            with pytest.raises(KeyError):
                st.get(miss)
    assert 3 not in st and None not in st


def _index_file(st: CodeStore) -> Path:
    files = list((st.path / INDEX_DIR).glob(f"*{INDEX_SUFFIX}"))
    assert len(files) == 1, files
    return files[0]


# ---------------------------------------------------------------------------- correctness


def test_all_ids_found_with_their_codes_and_misses(tmp_path: Path):
    ids_a, ids_b = _ids(300, "a/"), _ids(200, "b/")
    data = _fill(tmp_path / "st", {"rank1": ids_b, "rank0": ids_a})
    st = CodeStore.open(tmp_path / "st")
    _check_all(st, data)
    # Index order: writer name, then seq, then record order.
    assert st.ids() == ids_a + ids_b and list(st.ids()) == ids_a + ids_b
    assert st.ids()[10:20] == (ids_a + ids_b)[10:20] and st.ids()[::7] == (ids_a + ids_b)[::7]
    assert st.ids()[-1] == ids_b[-1] and len(st.ids()) == 500 and set(st.ids()) == set(data)
    assert st.id_at(301) == ids_b[1] and st.get_at(301).same_codes(data[ids_b[1]][0])
    assert [sid for sid, _ in st] == ids_a + ids_b
    # Every shard got its lookup file from the writer; one merged index.
    shards = st.path / "shards"
    assert sorted(p.stem for p in shards.glob("*.lookup")) == sorted(
        p.name[: -len(".idx.json")] for p in shards.glob("*.idx.json")
    )
    assert isinstance(st._idx, StoreIndex) and _index_file(st).name.endswith(INDEX_SUFFIX)
    # has_hash: the first id (index order) stored with the digest.
    first = {}
    for sid in ids_a + ids_b:
        if data[sid][1]:
            first.setdefault(data[sid][1], sid)
    assert all(st.has_hash(h) == sid and st.has_hash(h.upper()) == sid for h, sid in first.items())
    assert st.has_hash("f" * 64) is None and st.has_hash("zz") is None and st.has_hash("") is None
    report = st.verify()
    assert report.ok and not report.notes, report.summary()
    assert st.stats()["images"] == 500


def test_hash_collisions_never_return_the_wrong_record(tmp_path: Path, monkeypatch):
    # A hash that collides all the time: only the stored id strings tell the records apart.
    monkeypatch.setattr(store_ids, "id_hash_bytes", lambda b: len(b) % 3)
    monkeypatch.setattr(store_ids, "ID_HASH", "test-weak")
    ids = _ids(120)
    data = _fill(tmp_path / "st", {"w0": ids[:60], "w1": ids[60:] + ids[:5]})  # 5 duplicates across writers
    st = CodeStore.open(tmp_path / "st")
    assert len(st) == 120
    _check_all(st, data)  # the duplicates: the first claim (w0) wins
    assert st.entry(ids[0]).shard.startswith("w0-")
    assert {store_ids.id_hash(s) for s in ids} == {0, 1, 2}
    assert "abc" not in st and "zzzz" not in st and "1" * 13 not in st
    assert st.verify().duplicate_ids.keys() == set(ids[:5])


def test_index_rebuilt_when_another_writer_appends(tmp_path: Path):
    data = _fill(tmp_path / "st", {"rank0": _ids(50, "x/")})
    reader = CodeStore.open(tmp_path / "st")
    assert len(reader) == 50
    old = _index_file(reader)
    more = _fill(tmp_path / "st", {"rank1": _ids(40, "y/")}, seed=1)  # another process's writer
    assert len(reader) == 50  # not refreshed yet: the old mapping stays valid
    assert all(sid in reader for sid in data)
    reader.refresh()
    assert len(reader) == 90
    _check_all(reader, {**data, **more})
    new = _index_file(reader)
    assert new != old and not old.exists()  # superseded index removed
    # A writer of the same name continues numbering; its ids are refused as duplicates.
    w = CodeStore.open(tmp_path / "st", "a").writer(name="rank0")
    first = next(iter(data))
    with pytest.raises(ValueError, match="duplicate"):
        w.add(first, data[first][0])
    w.close()


def test_concurrent_first_opens_build_the_index_once(tmp_path: Path):
    """A process that finds the index missing while another builds it waits for that build and maps
    its file instead of building its own (the ranks of a job opening a changed store at once)."""
    from viq._io import first_lock
    from viq.store.index import BUILD_LOCK, index_dirs

    data = _fill(tmp_path / "st", {"w": _ids(60)})
    for f in (tmp_path / "st" / INDEX_DIR).glob(f"*{INDEX_SUFFIX}"):
        f.unlink()
    st = CodeStore.open(tmp_path / "st")  # the index is loaded lazily
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(message)s')\n"
        "from viq.store import CodeStore\n"
        f"st = CodeStore.open({str(tmp_path / 'st')!r})\n"
        "print('ready', flush=True)\n"
        "print('count', len(st), flush=True)\n"
    )
    with first_lock([tmp_path / "st" / INDEX_DIR / BUILD_LOCK]) as held:
        assert held is not None
        other = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert other.stdout.readline().strip() == "ready"
        time.sleep(1.0)
        assert other.poll() is None  # it waits for the lock instead of building
        from viq.store.derived import _build

        _build(st.path, st.store_config, st._entries, st._key, index_dirs(st.path), f"{st._key}{INDEX_SUFFIX}")
    out, _ = other.communicate(timeout=120)
    assert other.returncode == 0, out
    assert f"count {len(data)}" in out and "built index" not in out, out
    assert len(st) == len(data)


def test_first_lock_takes_the_first_usable_candidate(tmp_path: Path):
    """A lock file that cannot be created (here: its folder would sit under a file) is skipped; with
    no usable candidate the block runs unlocked (None) rather than failing."""
    from viq._io import first_lock

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with first_lock([blocker / "index" / ".lock", tmp_path / "cache" / ".lock"]) as held:
        assert held == tmp_path / "cache" / ".lock"
    with first_lock([blocker / "index" / ".lock"]) as held:
        assert held is None


def test_corrupt_index_file_is_rebuilt(tmp_path: Path, caplog):
    data = _fill(tmp_path / "st", {"w": _ids(100)})
    st = CodeStore.open(tmp_path / "st")
    len(st)
    path = _index_file(st)
    # Garbage: detected on open, rebuilt, right answers.
    path.write_bytes(b"VIQINDX1" + b"\xff" * 100)
    st2 = CodeStore.open(tmp_path / "st")
    _check_all(st2, data)
    assert "unusable" in caplog.text and str(path) in caplog.text
    # Truncated: detected on open (arrays past the end).
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    _check_all(CodeStore.open(tmp_path / "st"), data)
    # A flipped byte anywhere (here inside the id blob): the file no longer matches its stamp, so the
    # open checks every CRC, finds the mismatch and rebuilds: right answers, no wrong read.
    raw = bytearray(path.read_bytes())
    at = raw.find(b"images/sub1/img_1.png")
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))
    caplog.clear()
    st3 = CodeStore.open(tmp_path / "st")
    _check_all(st3, data)
    assert "checksum mismatch" in caplog.text
    # A flip that keeps size and mtime (bit rot under the stamp) is left to verify(): it rebuilds the
    # file and reports the repair (the CLI exits 1 unless --repair).
    raw = bytearray(path.read_bytes())
    st = path.stat()
    raw[raw.find(b"images/sub1/img_1.png")] ^= 0x01
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    stamp = path.with_name(path.name + ".ok")
    stamp.write_text(json.dumps([path.stat().st_size, path.stat().st_mtime_ns, path.stat().st_ino]))
    st4 = CodeStore.open(tmp_path / "st")
    report = st4.verify()
    assert report.ok and any("checksum mismatch" in r and "rebuilt" in r for r in report.repaired), report.summary()
    _check_all(st4, data)


def test_corrupt_or_stale_lookup_file(tmp_path: Path):
    data = _fill(tmp_path / "st", {"w": _ids(60)}, shard_bytes=1 << 20)
    lookup = next((tmp_path / "st" / "shards").glob(f"*{LOOKUP_SUFFIX}"))
    # Truncated lookup file: the merged index is derived from the JSON index instead (and the
    # lookup file rewritten).
    lookup.write_bytes(lookup.read_bytes()[:200])
    shutil.rmtree(tmp_path / "st" / INDEX_DIR, ignore_errors=True)
    _check_all(CodeStore.open(tmp_path / "st"), data)
    assert len(lookup.read_bytes()) > 200
    # A changed shard index (other size / mtime): its lookup file is stale and ignored; the JSON
    # index is the truth.
    idx_json = lookup.with_name(lookup.name[: -len(LOOKUP_SUFFIX)] + ".idx.json")
    obj = json.loads(idx_json.read_text())
    victim = obj["records"]["id"][3]
    obj["records"]["crc32"][3] ^= 1
    idx_json.write_text(json.dumps(obj))
    with pytest.raises(StoreError, match="CRC"):
        CodeStore.open(tmp_path / "st").get(victim)
    obj["records"]["crc32"][3] ^= 1
    idx_json.write_text(json.dumps(obj))
    _check_all(CodeStore.open(tmp_path / "st"), data)
    # A lookup file whose contents disagree with their checksums under a valid header: found when the
    # merged index is derived (lookups are checked whole), rebuilt from the JSON index: right answers.
    f = IndexFile(lookup, "shard")
    at = f.offsets["crc"] + 4 * 3
    del f
    raw = bytearray(lookup.read_bytes())
    raw[at] ^= 0xFF
    lookup.write_bytes(bytes(raw))
    os.utime(lookup)
    shutil.rmtree(tmp_path / "st" / INDEX_DIR, ignore_errors=True)
    st = CodeStore.open(tmp_path / "st")
    _check_all(st, data)
    report = st.verify()
    assert report.ok and report.repaired == [], report.summary()
    assert CodeStore.open(tmp_path / "st").verify().notes == []


def test_old_store_without_index_files(tmp_path: Path):
    data = _fill(tmp_path / "st", {"a": _ids(80, "a"), "b": _ids(30, "b")})
    for f in (tmp_path / "st" / "shards").glob(f"*{LOOKUP_SUFFIX}"):
        f.unlink()
    shutil.rmtree(tmp_path / "st" / INDEX_DIR, ignore_errors=True)
    st = CodeStore.open(tmp_path / "st")
    _check_all(st, data)  # built from a scan of the JSON indexes, once
    assert list((tmp_path / "st" / "shards").glob(f"*{LOOKUP_SUFFIX}"))
    assert _index_file(st).is_file()
    assert st.verify().ok


def test_unwritable_store_keeps_its_index_in_the_cache(tmp_path: Path, monkeypatch):
    data = _fill(tmp_path / "st", {"w": _ids(40)})
    shutil.rmtree(tmp_path / "st" / INDEX_DIR, ignore_errors=True)
    (tmp_path / "st" / INDEX_DIR).write_text("not a directory")  # (root ignores permissions)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    st = CodeStore.open(tmp_path / "st")
    _check_all(st, data)
    assert str(st._idx.path).startswith(str(tmp_path / "cache"))
    _check_all(CodeStore.open(tmp_path / "st"), data)  # found there again


# ---------------------------------------------------------------------------- sharing across processes


class _Probe(torch.utils.data.Dataset):
    def __init__(self, store: CodeStore) -> None:
        self.store = store
        self.n = len(store)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        inherited = self.store._index is not None  # the parent's mapped index, not a copy or a rebuild
        sid = self.store.id_at(i)
        mapped = str(self.store._idx.path) in Path("/proc/self/maps").read_text()
        return os.getpid(), inherited, mapped, sid, int(self.store[sid].indices.sum())


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_index_is_shared_by_forked_dataloader_workers(tmp_path: Path):
    data = _fill(tmp_path / "st", {"w": _ids(64)})
    st = CodeStore.open(tmp_path / "st")
    assert str(st._idx.path) in Path("/proc/self/maps").read_text()  # memory-mapped, not read
    loader = torch.utils.data.DataLoader(
        _Probe(st), batch_size=8, num_workers=2, collate_fn=list, multiprocessing_context="fork"
    )
    rows = [r for batch in loader for r in batch]
    assert {pid for pid, *_ in rows}.isdisjoint({os.getpid()}) and len({pid for pid, *_ in rows}) == 2
    assert all(inherited and mapped for _, inherited, mapped, _, _ in rows)
    assert [sid for *_, sid, _ in rows] == list(st.ids())
    assert all(total == int(data[sid][0].indices.sum()) for *_, sid, total in rows)
    # Pickled (spawn): no index arrays travel; the same index file is mapped again.
    blob = pickle.dumps(st)
    assert len(blob) < 4096
    st2 = pickle.loads(blob)
    assert st2._index is None and len(st2) == 64 and st2._idx.path == st._idx.path


def test_code_dataset_uses_the_index(tmp_path: Path):
    data = _fill(tmp_path / "st", {"w": _ids(30)})
    ds = CodeDataset(tmp_path / "st")  # all ids: a lazy view, no list
    assert not isinstance(ds.ids, list) and len(ds) == 30
    assert len(pickle.dumps(ds)) < 4096
    sid, codes = ds[5]
    assert codes.same_codes(data[sid][0])
    ds2 = CodeDataset(tmp_path / "st", ids=["3", "7"])
    assert [s for s, _ in (ds2[0], ds2[1])] == ["3", "7"]
    with pytest.raises(KeyError, match="1 id"):
        CodeDataset(tmp_path / "st", ids=["3", "missing"])


# ---------------------------------------------------------------------------- the benchmark


def test_store_scale_bench_small(tmp_path: Path):
    out = tmp_path / "rec.json"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.store_scale",
            "--ids",
            "20000",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path),
            "--lookups",
            "5000",
            "--gets",
            "500",
            "--per-shard",
            "4000",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    rec = json.loads(out.read_text())
    for key in (
        "ids",
        "open_s",
        "rss_bytes_per_id",
        "lookups_per_s",
        "build_s",
        "device",
        "date",
        "command",
        "first_open_s",
        "misses_per_s",
        "gets_per_s",
        "shards",
    ):
        assert key in rec, key
    assert rec["ids"] == 20000 and rec["shards"] >= 8 and rec["open_s"] > 0 and rec["lookups_per_s"] > 0
    assert not list(tmp_path.glob("store_scale-*"))  # the store is removed


def test_verify_exit_status_after_a_repair(tmp_path: Path):
    """`viq store verify` exits 1 when it had to rebuild a damaged index (the store is sound again, but
    something damaged it), 0 with --repair; 0 on a sound store."""
    from viq.cli.main import main

    _fill(tmp_path / "st", {"w": _ids(40)})
    st = CodeStore.open(tmp_path / "st")
    len(st)  # the merged index is built on first use
    path = _index_file(st)
    assert main(["store", "verify", str(tmp_path / "st"), "-q"]) == 0

    def rot() -> None:  # a flipped bit under an unchanged size and mtime: only verify reads it
        raw = bytearray(path.read_bytes())
        before = path.stat()
        raw[raw.find(b".jpg")] ^= 0x02
        path.write_bytes(bytes(raw))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = path.stat()
        path.with_name(path.name + ".ok").write_text(json.dumps([after.st_size, after.st_mtime_ns, after.st_ino]))

    rot()
    assert main(["store", "verify", str(tmp_path / "st"), "-q"]) == 1
    st = CodeStore.open(tmp_path / "st")
    len(st)
    path = _index_file(st)
    rot()
    assert main(["store", "verify", str(tmp_path / "st"), "-q", "--repair"]) == 0
    assert main(["store", "verify", str(tmp_path / "st"), "-q"]) == 0


def test_a_crafted_index_with_valid_checksums(tmp_path: Path):
    """An index whose entries point elsewhere but whose CRCs were recomputed: `viq store verify` checks
    every entry against the shard indexes, rebuilds it and says so (exit 1); the store answers right after."""
    import struct
    import zlib

    from viq.cli.main import main

    data = _fill(tmp_path / "st", {"w": _ids(60)})
    st = CodeStore.open(tmp_path / "st")
    len(st)
    path = _index_file(st)
    raw = bytearray(path.read_bytes())
    magic, hlen = struct.unpack_from("<8sQ", raw, 0)
    header = json.loads(raw[16 : 16 + hlen].decode())
    dtype, shape, offset, _ = header["arrays"]["offset"]
    values = np.frombuffer(bytes(raw[offset : offset + 8 * int(np.prod(shape))]), dtype=dtype).copy()
    values[[3, 4]] = values[[4, 3]]  # two records swapped: every byte a valid offset, but the wrong one
    raw[offset : offset + values.nbytes] = values.tobytes()
    header["arrays"]["offset"][3] = zlib.crc32(values.tobytes())
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= hlen
    raw[16 : 16 + hlen] = text + b" " * (hlen - len(text))
    before = path.stat()
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    path.with_name(path.name + ".ok").write_text(json.dumps([after.st_size, after.st_mtime_ns, after.st_ino]))
    assert not IndexFile(path, "store").check_crcs()  # the crafted case: checksums alone say it is fine
    report = CodeStore.open(tmp_path / "st").verify()
    assert report.ok and any("is not a record of its shard index" in r for r in report.repaired), report.summary()
    _check_all(CodeStore.open(tmp_path / "st"), data)
    assert main(["store", "verify", str(tmp_path / "st"), "-q"]) == 0


def test_a_skipped_shard_is_named_by_every_reading_command(tmp_path: Path, caplog):
    """A shard index with a negative offset: the shard is skipped, and every later `stats` says so
    again (it used to warn once, when the merged index was built, then report a smaller store quietly)."""
    import logging

    from viq.cli.main import main

    _fill(tmp_path / "st", {"w": _ids(20)}, shard_bytes=1 << 20)
    idx_json = next((tmp_path / "st" / "shards").glob("*.idx.json"))
    obj = json.loads(idx_json.read_text())
    offsets = next(k for k in obj["records"] if k.startswith("offset"))
    obj["records"][offsets][0] = -5
    idx_json.write_text(json.dumps(obj))
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            main(["store", "stats", str(tmp_path / "st")])
        assert any(idx_json.name in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records), caplog.text
