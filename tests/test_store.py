"""Tests for viq.store: the sharded code store (round trips, sizes, crash safety, verify, dataset)."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from viq.cli.main import main as cli_main
from viq.data.codes import CodeDataset
from viq.formats.codes import Codes, bits_for_levels, pack_bits
from viq.model.config import FSQ_LEVELS
from viq.store import CodeStore, StoreError
from viq.store.check import plot_stats
from viq.store.format import file_sha256

LEVEL_SETS = list(FSQ_LEVELS.values())  # the five released sizes
# Payload bits per padded pixel from the docs/formats.md table: 4 codes * B bits / (16 * 16).
DOC_BPP = {
    (8, 8, 4, 3, 3): 0.1875,
    (8, 8, 4, 4, 4): 0.1875,
    (8, 8, 8, 4, 4): 0.203125,
    (8, 8, 8, 6, 5): 0.21875,
    (8, 8, 8, 5, 5, 5): 0.25,
}
FP = "0123456789abcdef"


def _random_codes(levels, rng: np.random.Generator, grid=None, *, high=None, with_size=None) -> Codes:
    """Random codes on a random grid (h, w in [1, 8]); image_size known for about half."""
    h, w = grid if grid is not None else (int(rng.integers(1, 9)), int(rng.integers(1, 9)))
    k = math.prod(levels) if high is None else high
    idx = rng.integers(0, k, size=(h, w, 4))
    if with_size is None:
        with_size = bool(rng.integers(0, 2))
    size = None
    if with_size:
        size = (int(rng.integers((h - 1) * 16 + 1, h * 16 + 1)), int(rng.integers((w - 1) * 16 + 1, w * 16 + 1)))
    return Codes(idx, levels, image_size=size)


def _fill(store: CodeStore, writers: dict[str, int], levels, seed: int = 0) -> dict[str, Codes]:
    """Add ``count`` random samples per writer name, interleaved; returns id -> codes."""
    rng = np.random.default_rng(seed)
    out: dict[str, Codes] = {}
    ws = {name: store.writer(name=name) for name in writers}
    for i in range(max(writers.values())):
        for name, count in writers.items():
            if i < count:
                grid = (1, 1) if i == 0 else None
                codes = _random_codes(levels, rng, grid)
                sid = f"{name}/img{i:04d}"
                ws[name].add(sid, codes, source=f"/data/{sid}.png")
                out[sid] = codes
    for w in ws.values():
        w.close()
    return out


def _load_index(path: Path) -> dict:
    return json.loads(path.read_text())


def _save_index(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj))


def _rehash(shard: Path, index_path: Path) -> None:
    """Recompute the shard checksum in its index (to craft damage that checksums cannot see)."""
    idx = _load_index(index_path)
    idx["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    _save_index(index_path, idx)


@pytest.fixture
def small_store(tmp_path: Path):
    levels = (8, 8, 4, 3, 3)
    store = CodeStore.create(tmp_path / "s", levels=levels, model_fingerprint=FP, shard_bytes=1024)
    data = _fill(store, {"a": 12, "b": 12}, levels)
    return CodeStore.open(tmp_path / "s"), data


# ---------------------------------------------------------------------------- round trips and sizes


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_round_trip_two_writers_many_shards(tmp_path: Path, levels):
    store = CodeStore.create(tmp_path / "st", levels=levels, model_fingerprint=FP, shard_bytes=4096)
    data = _fill(store, {"rank0": 100, "rank1": 100}, levels, seed=len(levels) * 1000 + levels[-1])

    shards = sorted(p.name for p in (tmp_path / "st" / "shards").glob("*.bin"))
    assert sum(n.startswith("rank0-") for n in shards) >= 3 and sum(n.startswith("rank1-") for n in shards) >= 3
    assert not list((tmp_path / "st" / "shards").glob("*.tmp"))

    assert len(store) == 200  # close() refreshed the writers' own store object
    st = CodeStore.open(tmp_path / "st")
    assert len(st) == 200
    # Index order: shard order (writer name, then seq), then record order.
    assert st.ids() == sorted(data, key=lambda s: (s.split("/")[0], s))
    for sid, codes in data.items():
        assert sid in st
        got = st.get(sid)
        assert got.same_codes(codes) and got.image_size == codes.image_size
        assert got.metadata == {"model": FP, "source": f"/data/{sid}.png"}
        e = st.entry(sid)
        assert e.grid == codes.grid and e.image_size == codes.image_size and e.levels == levels
        assert e.model_fingerprint == FP and e.source == f"/data/{sid}.png"
        assert e.length == math.ceil(e.num_codes * bits_for_levels(levels) / 8)  # bit-packed, no header
    seen = dict(iter(st))
    assert list(seen) == st.ids()
    assert all(seen[sid].same_codes(data[sid]) for sid in data)
    assert "missing" not in st
    with pytest.raises(KeyError):
        st.get("missing")
    assert st.verify().ok


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_payload_size_matches_documented_bits_per_code(tmp_path: Path, levels):
    bits = bits_for_levels(levels)
    store = CodeStore.create(tmp_path / "st", levels=levels, model_fingerprint=FP)
    rng = np.random.default_rng(1)
    with store.writer(name="w") as w:
        for i in range(6):
            # 4 * 8 patches * 4 codes * B bits is a whole number of bytes for every B.
            w.add(f"i{i}", _random_codes(levels, rng, (4, 8), with_size=False))
    st = CodeStore.open(tmp_path / "st")
    assert st.entry("i0").length == 4 * 8 * 4 * bits // 8
    s = st.stats()
    assert s["payload_bits_per_code"] == bits
    assert s["bpp_payload_padded"] == pytest.approx(DOC_BPP[levels], abs=1e-12)
    assert s["bpp_payload"] == s["bpp_payload_padded"]  # image size unknown -> padded pixels
    assert s["bpp"] > s["bpp_payload"]  # headers, indexes and store.json cost something
    if levels == (8, 8, 8, 5, 5, 5):
        assert s["bpp_payload"] == 0.25


def test_entropy_coding_gain_only_on_skewed_codes(tmp_path: Path):
    levels = (8, 8, 8, 6, 5)  # B = 14
    rng = np.random.default_rng(2)
    uniform = [_random_codes(levels, rng, (16, 16)) for _ in range(4)]
    # Skewed: 8 distinct codes spread over the codebook (order-0 entropy 3 bits/code).
    skewed = [Codes(rng.integers(0, 8, (16, 16, 4)) * 1901, levels) for _ in range(4)]
    results = {}
    for name, items in (("uniform", uniform), ("skewed", skewed)):
        for coded in (False, True):
            path = tmp_path / f"{name}-{coded}"
            store = CodeStore.create(path, levels=levels, model_fingerprint=FP, entropy_coding=coded)
            with store.writer(name="w") as w:
                for i, c in enumerate(items):
                    w.add(f"{i}", c)
            st = CodeStore.open(path)
            assert st.config["codec"] == ("lzma" if coded else "packed")
            assert all(st.get(f"{i}").same_codes(c) for i, c in enumerate(items))
            assert st.verify().ok
            results[name, coded] = st.stats()["payload_bits_per_code"]
    assert results["uniform", False] == results["skewed", False] == 14
    # Random codes: nothing to gain, and the fallback caps the cost at one tag byte per record.
    assert 13.5 <= results["uniform", True] <= 14 + 8 / 1024
    # Few distinct codes: a large gain (order-0 entropy is 3 bits/code).
    assert results["skewed", True] < 7


# ---------------------------------------------------------------------------- crash safety


def test_killed_writer_leftovers_are_ignored_and_cleaned(tmp_path: Path):
    levels = (8, 8, 4, 4, 4)
    rng = np.random.default_rng(3)
    store = CodeStore.create(tmp_path / "st", levels=levels, model_fingerprint=FP, shard_bytes=1 << 20)
    shards = tmp_path / "st" / "shards"
    w = store.writer(name="rank0")
    kept = {f"k{i}": _random_codes(levels, rng) for i in range(5)}
    for sid, c in kept.items():
        w.add(sid, c)
    w.flush()  # rank0-000000 finalised
    for i in range(5):
        w.add(f"lost{i}", _random_codes(levels, rng))
    # "kill -9": the writer object is abandoned with an unflushed rank0-000001.bin.tmp ...
    assert (shards / "rank0-000001.bin.tmp").is_file()
    del w
    # ... plus a crash between the two renames of a later shard (shard without index, index tmp)
    # and a truncated temp index.
    (shards / "rank0-000002.bin").write_bytes(b"VIQS\x01\x00\x00\x00garbage")
    (shards / "rank0-000002.idx.json.tmp").write_text('{"format": "viq-code-sto')
    # Leftovers of another writer name must survive rank0's clean-up.
    (shards / "rank1-000000.bin.tmp").write_bytes(b"partial")

    st = CodeStore.open(tmp_path / "st")
    assert sorted(st.ids()) == sorted(kept)
    report = st.verify()
    assert report.ok, report.summary()
    assert len(report.notes) == 4  # three temp files and the orphan shard

    w2 = CodeStore.open(tmp_path / "st", "a").writer(name="rank0")
    names = sorted(p.name for p in shards.iterdir())
    # (.lookup: the shard's binary lookup file, a cache of its index for the compact store index)
    # (.rank0.lock: held by the one process writing as rank0; it stays, the kernel drops the lock)
    assert names == [
        ".rank0.lock",
        "rank0-000000.bin",
        "rank0-000000.idx.json",
        "rank0-000000.lookup",
        "rank1-000000.bin.tmp",
    ]
    with pytest.raises(ValueError, match="duplicate"):
        w2.add("k0", kept["k0"])  # finalised by the previous run of the same writer name
    redo = {f"lost{i}": _random_codes(levels, rng) for i in range(5)}
    for sid, c in redo.items():
        w2.add(sid, c)
    w2.close()
    assert (shards / "rank0-000001.bin").is_file() and (shards / "rank0-000001.idx.json").is_file()
    st.refresh()
    assert len(st) == 10 and all(st.get(s).same_codes(c) for s, c in {**kept, **redo}.items())
    assert st.verify().ok


def test_index_without_shard_is_reported(small_store):
    st, _ = small_store
    victim = st.entry("a/img0000").shard
    (st.path / "shards" / victim).unlink()
    st2 = CodeStore.open(st.path)  # still opens; that shard's records are unavailable
    assert "a/img0000" not in st2 and len(st2) < 24
    report = st2.verify()
    assert not report.ok and any("missing" in p and victim in p for p in report.problems)


# ---------------------------------------------------------------------------- verify detects damage


def test_verify_detects_flipped_byte(small_store):
    st, _ = small_store
    e = st.entry("b/img0003")
    shard = st.path / "shards" / e.shard
    raw = bytearray(shard.read_bytes())
    raw[e.offset + 1] ^= 0x10
    shard.write_bytes(bytes(raw))
    st = CodeStore.open(st.path)
    report = st.verify()
    assert any("sha256" in p and e.shard in p for p in report.problems)
    assert any("CRC" in p and "b/img0003" in p for p in report.problems)
    with pytest.raises(StoreError, match="CRC"):
        st.get("b/img0003")


def test_verify_detects_out_of_range_code_with_valid_checksums(small_store):
    st, _ = small_store
    e = st.entry("a/img0005")
    n = e.num_codes
    bad = pack_bits(np.full(n, 4000), 12)  # 12-bit code 4000 >= K = 2304
    assert len(bad) == e.length
    shard = st.path / "shards" / e.shard
    index = shard.with_name(e.shard[: -len(".bin")] + ".idx.json")
    raw = bytearray(shard.read_bytes())
    raw[e.offset : e.offset + e.length] = bad
    shard.write_bytes(bytes(raw))
    idx = _load_index(index)
    row = idx["records"]["id"].index("a/img0005")
    idx["records"]["crc32"][row] = zlib.crc32(bad)
    _save_index(index, idx)
    _rehash(shard, index)
    st = CodeStore.open(st.path)
    report = st.verify()
    assert len(report.problems) == 1 and "out of range" in report.problems[0], report.summary()
    with pytest.raises(StoreError, match="out of range"):
        st.get("a/img0005")


def test_verify_detects_index_past_end(small_store):
    st, _ = small_store
    e = st.entry("a/img0002")
    index = st.path / "shards" / (e.shard[: -len(".bin")] + ".idx.json")
    idx = _load_index(index)
    row = idx["records"]["id"].index("a/img0002")
    idx["records"]["offset"][row] = idx["shard_size"] + 100
    _save_index(index, idx)
    st = CodeStore.open(st.path)
    report = st.verify()
    assert any("past the end" in p and "a/img0002" in p for p in report.problems), report.summary()
    with pytest.raises(StoreError, match="outside the shard"):
        st.get("a/img0002")


def test_duplicate_ids_across_writers(tmp_path: Path):
    levels = (8, 8, 8, 4, 4)
    rng = np.random.default_rng(4)
    store = CodeStore.create(tmp_path / "st", levels=levels, model_fingerprint=FP)
    first, second = _random_codes(levels, rng), _random_codes(levels, rng)
    with store.writer(name="b") as wb:
        wb.add("same", second)
        wb.add("only-b", second)
    with store.writer(name="a") as wa:
        wa.add("same", first)
    st = CodeStore.open(tmp_path / "st")
    assert len(st) == 2
    assert st.get("same").same_codes(first)  # first by shard name: a-000000.bin < b-000000.bin
    assert [sid for sid, _ in st] == ["same", "only-b"]
    report = st.verify()
    assert report.duplicate_ids == {"same": ["a-000000.bin", "b-000000.bin"]}
    assert any("stored more than once" in p for p in report.problems)


def test_duplicate_id_within_writer_is_refused(tmp_path: Path):
    levels = (8, 8, 4, 3, 3)
    rng = np.random.default_rng(5)
    store = CodeStore.create(tmp_path / "st", levels=levels, model_fingerprint=FP, shard_bytes=64)
    with store.writer(name="w") as w:
        w.add("x", _random_codes(levels, rng))
        w.add("y", _random_codes(levels, rng))  # "x" is finalised by now (tiny shard_bytes)
        with pytest.raises(ValueError, match="duplicate"):
            w.add("x", _random_codes(levels, rng))
        assert "x" in w


# ---------------------------------------------------------------------------- refusals and errors


def test_refuses_codes_of_another_code_space(tmp_path: Path):
    levels = (8, 8, 4, 3, 3)
    rng = np.random.default_rng(6)
    store = CodeStore.create(tmp_path / "st", levels=levels, model_fingerprint=FP)
    with store.writer(name="w") as w:
        with pytest.raises(StoreError, match="levels"):
            w.add("a", _random_codes((8, 8, 8, 6, 5), rng))
        other_model = _random_codes(levels, rng)
        other_model = Codes(other_model.indices, levels, metadata={"model": "fedcba9876543210"})
        with pytest.raises(StoreError, match="model fingerprint"):
            w.add("b", other_model)
        with pytest.raises(StoreError, match="codes_per_patch"):
            w.add("c", Codes(np.zeros((2, 2, 3), dtype=np.int64), levels))
        same_model = Codes(other_model.indices, levels, metadata={"model": FP})
        w.add("d", same_model)
    assert CodeStore.open(tmp_path / "st").ids() == ["d"]
    # Re-creating with another configuration is refused; with the same one it opens.
    with pytest.raises(StoreError, match="model_fingerprint"):
        CodeStore.create(tmp_path / "st", levels=levels, model_fingerprint="another")
    with pytest.raises(StoreError, match="levels"):
        CodeStore.create(tmp_path / "st", levels=(8, 8, 8, 6, 5), model_fingerprint=FP)
    assert len(CodeStore.create(tmp_path / "st", levels=levels, model_fingerprint=FP)) == 1
    with pytest.raises(StoreError, match="already exists"):
        CodeStore.create(tmp_path / "st", levels=levels, model_fingerprint=FP, exist_ok=False)
    with pytest.raises(StoreError, match="read-only"):
        CodeStore.open(tmp_path / "st").writer(name="w2")


def test_open_errors_name_the_path(tmp_path: Path):
    plain = tmp_path / "images"
    plain.mkdir()
    (plain / "cat.png").write_bytes(b"x")
    with pytest.raises(StoreError, match="not a viq code store") as exc:
        CodeStore.open(plain)
    assert str(plain) in str(exc.value)
    with pytest.raises(StoreError, match="no such directory"):
        CodeStore.open(tmp_path / "nope")
    with pytest.raises(StoreError, match="not empty"):
        CodeStore.create(plain, levels=(8, 8, 4, 3, 3), model_fingerprint=FP)

    CodeStore.create(tmp_path / "st", levels=(8, 8, 4, 3, 3), model_fingerprint=FP)
    cfg_path = tmp_path / "st" / "store.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(StoreError, match="version 99") as exc:
        CodeStore.open(tmp_path / "st")
    assert str(cfg_path) in str(exc.value)
    cfg_path.write_text(json.dumps({**cfg, "bits_per_code": 16}))
    with pytest.raises(StoreError, match="bits_per_code"):
        CodeStore.open(tmp_path / "st")
    cfg_path.write_text("{not json")
    with pytest.raises(StoreError, match="corrupt"):
        CodeStore.open(tmp_path / "st")
    assert cli_main(["store", "verify", str(tmp_path / "st")]) == 2


def test_corrupt_index_skips_shard_and_verify_reports_it(small_store):
    st, _ = small_store
    index = min((st.path / "shards").glob("b-*.idx.json"))
    index.write_text("{broken")
    st2 = CodeStore.open(st.path)
    assert len(st2) < len(st)
    assert any(index.name in p for p in st2.verify().problems)


# ---------------------------------------------------------------------------- reading APIs


def test_refresh_sees_shards_finalised_by_another_writer(tmp_path: Path):
    levels = (8, 8, 4, 4, 4)
    rng = np.random.default_rng(7)
    store = CodeStore.create(tmp_path / "st", levels=levels, model_fingerprint=FP)
    reader = CodeStore.open(tmp_path / "st")
    w = store.writer(name="w")
    w.add("a", _random_codes(levels, rng))
    reader.refresh()
    assert len(reader) == 0  # not flushed yet: invisible
    w.flush()
    reader.refresh()
    assert reader.ids() == ["a"]
    w.close()


def test_has_hash_dedup(tmp_path: Path):
    levels = (8, 8, 8, 4, 4)
    rng = np.random.default_rng(8)
    image = tmp_path / "img.png"
    image.write_bytes(b"\x89PNG fake image bytes")
    digest = file_sha256(image)
    assert digest == hashlib.sha256(image.read_bytes()).hexdigest()
    store = CodeStore.create(tmp_path / "st", levels=levels, model_fingerprint=FP)
    with store.writer(name="w") as w:
        w.add("first", _random_codes(levels, rng), source=str(image), content_hash=digest)
        assert w.has_hash(digest) == "first"  # visible to the writer before its flush
        w.add("other", _random_codes(levels, rng), content_hash="0" * 64)
        with pytest.raises(ValueError, match="content_hash"):
            w.add("bad", _random_codes(levels, rng), content_hash="xyz")
    st = CodeStore.open(tmp_path / "st")
    assert st.has_hash(digest) == "first" and st.has_hash(digest.upper()) == "first"
    assert st.has_hash("f" * 64) is None and st.has_hash("") is None
    assert st.entry("first").content_hash == digest and st.entry("first").source == str(image)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_code_dataset_with_dataloader(small_store, num_workers: int):
    st, data = small_store
    ids = st.ids()[::2]
    ds = CodeDataset(st.path, ids=ids)
    ds[0]  # maps a shard in this process; pickling must not carry it along
    ds2 = pickle.loads(pickle.dumps(ds))
    assert ds2[1][1].same_codes(data[ids[1]])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=num_workers, collate_fn=list)
    got = [item for batch in loader for item in batch]
    assert [sid for sid, _ in got] == ids
    assert all(c.same_codes(data[sid]) for sid, c in got)
    with pytest.raises(KeyError):
        CodeDataset(st.path, ids=["nope"])


def test_stats_and_plot(small_store, tmp_path: Path, capsys):
    st, data = small_store
    s = st.stats()
    total = sum(c.num_codes for c in data.values())
    assert s["images"] == len(data) and s["total_codes"] == total
    assert s["histogram"].shape == (2304,) and int(s["histogram"].sum()) == total
    assert 0 < s["entropy_bits"] <= s["bits_per_code"]
    assert s["perplexity"] == pytest.approx(2 ** s["entropy_bits"])
    assert s["codebook_used"] == len(np.unique(np.concatenate([c.indices.numpy().ravel() for c in data.values()])))
    png = plot_stats(st, tmp_path / "usage.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert cli_main(["store", "stats", str(st.path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["total_codes"] == total and "histogram" not in printed
    assert cli_main(["store", "stats", str(st.path), "--plot", str(tmp_path / "u2.png")]) == 0
    assert "bits/pixel" in capsys.readouterr().out and (tmp_path / "u2.png").is_file()
    assert cli_main(["store", "verify", str(st.path)]) == 0
    assert "OK" in capsys.readouterr().out


def test_empty_store_stats(tmp_path: Path):
    st = CodeStore.create(tmp_path / "st", levels=(8, 8, 4, 3, 3), model_fingerprint=FP)
    s = st.stats()
    assert s["images"] == 0 and s["bpp"] is None and s["entropy_bits"] is None
    assert len(st) == 0 and list(st) == [] and st.verify().ok


def test_store_commands_errors_and_progress(small_store, tmp_path: Path, capsys):
    """Errors are prefixed like every viq command; progress callbacks add up to the records read."""
    st, data = small_store
    assert cli_main(["store", "verify", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("viq: error:") and "nope" in err
    seen: list[int] = []
    assert st.verify(progress=seen.append).ok and sum(seen) == len(st) == len(data)
    seen.clear()
    st.stats(progress=seen.append)
    assert sum(seen) == len(data)
