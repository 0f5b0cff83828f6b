"""WebDataset tar shards: brace patterns, streaming (one sequential read per shard, nothing listed),
sample grouping, resume that skips finished shards unopened, and kill -9 at random moments."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

import viq
import viq.data.shards as shards_module
from test_extract import _cli, make_images, store_content
from viq.data.shards import expand_braces, iter_samples, list_shards, split_member
from viq.extract import DONE_FILE, extract
from viq.store.reader import CodeStore


def write_shards(folder: Path, images: list[Path], per_shard: int, sidecars: bool = True) -> list[Path]:
    """WebDataset shards: sample k = <key>.png (+ <key>.json, <key>.txt), ``per_shard`` samples each."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, len(images), per_shard):
        path = folder / f"shard-{s // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for img in images[s : s + per_shard]:
                members = [(f"{img.stem}.png", img.read_bytes())]
                if sidecars:
                    members += [
                        (f"{img.stem}.json", json.dumps({"caption": img.stem}).encode()),
                        (f"{img.stem}.txt", img.stem.encode()),
                    ]
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


class OpenLog:
    """Counts tarfile.open calls of viq.data.shards, by shard name and mode."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, str]] = []
        real = tarfile.open

        def spy(name=None, mode="r", *args, **kwargs):
            self.calls.append((Path(name).name, mode))
            return real(name, mode, *args, **kwargs)

        monkeypatch.setattr(shards_module.tarfile, "open", spy)

    def names(self) -> list[str]:
        return [n for n, _ in self.calls]


def test_expand_braces():
    assert expand_braces("s/{000..003}.tar") == [f"s/{i:03d}.tar" for i in range(4)]
    assert expand_braces("{a,b}-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar", "b-8.tar", "b-9.tar", "b-10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="unbalanced"):
        expand_braces("s/{000..003.tar")
    with pytest.raises(ValueError, match="cannot expand"):
        expand_braces("s/{x}.tar")


def test_split_member():
    assert split_member("a/b/0001.seg.PNG") == ("a/b/0001", "seg.png")
    assert split_member("0001.jpg") == ("0001", "jpg")


def test_list_shards_opens_nothing(tmp_path, monkeypatch):
    images = make_images(tmp_path / "imgs", 6, bad=False)
    write_shards(tmp_path / "shards", images, 2)
    (tmp_path / "shards" / "notes.txt").write_text("not a shard")
    log = OpenLog(monkeypatch)
    by_folder = list_shards(tmp_path / "shards")
    by_pattern = list_shards(str(tmp_path / "shards" / "shard-{00000..00002}.tar"))
    assert [p.name for p in by_folder] == [p.name for p in by_pattern] == [f"shard-{i:05d}.tar" for i in range(3)]
    assert log.calls == []
    with pytest.raises(FileNotFoundError, match="1 of 4 shards missing"):
        list_shards(str(tmp_path / "shards" / "shard-{00000..00003}.tar"))


def test_samples_group_members_by_key(tmp_path):
    images = make_images(tmp_path / "imgs", 3, bad=False)
    (shard,) = write_shards(tmp_path / "shards", images, 3)
    samples = list(iter_samples(shard))
    assert [s.key for s in samples] == [p.stem for p in images]
    assert set(samples[0].fields) == {"png", "json", "txt"}
    assert json.loads(samples[1].fields["json"]) == {"caption": images[1].stem}
    assert samples[2].fields["png"] == images[2].read_bytes()
    assert [s.key for s in iter_samples(shard, wanted={"txt"})] == [p.stem for p in images]
    assert all(set(s.fields) == {"txt"} for s in iter_samples(shard, wanted={"txt"}))


def test_each_shard_read_once_in_stream_mode_and_resume_skips_done_shards(model_dir, tmp_path, monkeypatch):
    images = make_images(tmp_path / "imgs", 12, seed=3, bad=False)
    (tmp_path / "imgs" / "img000.png").write_bytes(images[0].read_bytes())
    shards = write_shards(tmp_path / "shards", images, 3)
    log = OpenLog(monkeypatch)
    counts = extract(
        model_dir,
        str(tmp_path / "shards" / "shard-{00000..00003}.tar"),
        tmp_path / "store",
        num_workers=0,
        flush_every=2,
        progress=False,
    )
    assert counts == {"images": 12, "encoded": 12, "existing": 0, "deduplicated": 0, "failed": 0}
    assert sorted(log.calls) == sorted((p.name, "r|*") for p in shards)  # once each, sequentially
    store = CodeStore.open(tmp_path / "store")
    assert store.verify().ok and len(store) == 12
    model = viq.load(model_dir, components=["encoder"])
    assert store.get(f"shard-00001.tar/{images[4].stem}.png").same_codes(model.encode([str(images[4])])[0])
    done = [json.loads(line) for line in (tmp_path / "store" / DONE_FILE.format(rank=0)).read_text().splitlines()]
    assert sorted(d["unit"] for d in done) == [p.name for p in shards] and all(d["images"] == 3 for d in done)
    # A re-run opens no shard at all and reports everything as existing.
    log.calls.clear()
    again = extract(model_dir, tmp_path / "shards", tmp_path / "store", num_workers=0, progress=False)
    assert log.calls == [] and again == {**counts, "encoded": 0, "existing": 12}


def test_half_done_shard_is_finished_without_duplicates(model_dir, tmp_path, monkeypatch):
    images = make_images(tmp_path / "imgs", 8, seed=4, bad=False)
    shards = write_shards(tmp_path / "shards", images, 4)
    extract(model_dir, tmp_path / "shards", tmp_path / "ref", num_workers=0, progress=False)
    # A previous run stored two images of shard 1 and recorded only shard 0 as done.
    extract(model_dir, shards[0], tmp_path / "store", num_workers=0, progress=False)
    partial = tmp_path / "partial.tar"
    with tarfile.open(shards[1]) as src, tarfile.open(partial, "w") as dst:
        for m in src.getmembers()[:6]:  # two samples of three members
            dst.addfile(m, src.extractfile(m))
    (tmp_path / "half").mkdir()
    half = tmp_path / "half" / shards[1].name
    os.replace(partial, half)
    extract(model_dir, half, tmp_path / "store", num_workers=0, progress=False)
    (tmp_path / "store" / DONE_FILE.format(rank=0)).write_text(json.dumps({"unit": shards[0].name, "images": 4}) + "\n")
    log = OpenLog(monkeypatch)
    counts = extract(model_dir, tmp_path / "shards", tmp_path / "store", num_workers=0, progress=False)
    assert log.names() == [shards[1].name]  # shard 0 is not opened again
    assert counts == {"images": 8, "encoded": 2, "existing": 6, "deduplicated": 0, "failed": 0}
    store = CodeStore.open(tmp_path / "store")
    assert store.verify().ok and len(store) == 8
    assert store_content(tmp_path / "store") == store_content(tmp_path / "ref")


def test_truncated_shard_is_reported_and_retried(model_dir, tmp_path):
    images = make_images(tmp_path / "imgs", 6, seed=5, bad=False)
    shards = write_shards(tmp_path / "shards", images, 3, sidecars=False)
    good = shards[1].read_bytes()
    shards[1].write_bytes(good[: len(good) // 2])  # cut in the middle of a member
    counts = extract(model_dir, tmp_path / "shards", tmp_path / "store", num_workers=0, progress=False)
    assert counts["failed"] == 1 and counts["encoded"] >= 3
    errors = [json.loads(line) for line in (tmp_path / "store" / "errors-rank0.jsonl").read_text().splitlines()]
    assert errors[-1]["id"] == shards[1].name
    done = (tmp_path / "store" / DONE_FILE.format(rank=0)).read_text()
    assert shards[0].name in done and shards[1].name not in done
    shards[1].write_bytes(good)  # repaired: the re-run finishes it, nothing twice
    again = extract(model_dir, tmp_path / "shards", tmp_path / "store", num_workers=0, progress=False)
    assert again["failed"] == 0 and again["images"] == 6
    store = CodeStore.open(tmp_path / "store")
    assert store.verify().ok and len(store) == 6


def test_worker_processes_share_the_shards(model_dir, tmp_path):
    images = make_images(tmp_path / "imgs", 8, seed=6, bad=False)
    write_shards(tmp_path / "shards", images, 2)
    extract(model_dir, tmp_path / "shards", tmp_path / "one", num_workers=0, progress=False)
    counts = extract(model_dir, tmp_path / "shards", tmp_path / "two", num_workers=2, progress=False)
    assert counts["encoded"] == 8
    assert store_content(tmp_path / "two") == store_content(tmp_path / "one")
    assert len((tmp_path / "two" / DONE_FILE.format(rank=0)).read_text().splitlines()) == 4


def test_kill_and_resume_tar_shards_gives_the_uninterrupted_store(model_dir, tmp_path):
    images = make_images(tmp_path / "imgs", 40, seed=7, bad=False)
    write_shards(tmp_path / "shards", images, 5)
    pattern = str(tmp_path / "shards" / "shard-{00000..00007}.tar")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    extract(model_dir, pattern, tmp_path / "ref", num_workers=0, flush_every=3, batch_tokens=40, progress=False)
    rng = random.Random(1)
    for _ in range(4):  # SIGKILL at random moments, then re-run
        proc = subprocess.Popen(
            _cli(model_dir, pattern, tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(rng.uniform(1.5, 5.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    subprocess.run(_cli(model_dir, pattern, tmp_path / "killed"), env=env, check=True, capture_output=True)
    store = CodeStore.open(tmp_path / "killed")
    assert store.verify().ok
    assert len(store) == 40 and len(set(store.ids())) == 40
    assert store_content(tmp_path / "killed") == store_content(tmp_path / "ref")
    done = set()
    for path in (tmp_path / "killed").glob("done-units-rank*.jsonl"):
        done |= {json.loads(line)["unit"] for line in path.read_text().splitlines()}
    assert done == {f"shard-{i:05d}.tar" for i in range(8)}
