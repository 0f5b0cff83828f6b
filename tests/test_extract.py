"""Offline extraction into a code store: bad files, kill-and-resume, 2 processes, equality with encode."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import viq
from viq.extract import extract, list_items
from viq.formats.codes import bits_for_levels
from viq.store.reader import CodeStore


def make_images(folder: Path, n: int, seed: int = 0, bad: bool = True) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(8, 60)), int(rng.integers(8, 90))
        p = folder / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    if bad:
        (folder / "empty.png").write_bytes(b"")
        (folder / "text.jpg").write_text("not an image")
        data = paths[0].read_bytes()
        (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    return paths


def store_content(path: Path) -> dict[str, list]:
    store = CodeStore.open(path)
    return {sid: codes.flat().tolist() for sid, codes in store}


def test_folder_with_bad_files(model_dir, tmp_path):
    paths = make_images(tmp_path / "imgs", 12)
    (tmp_path / "imgs" / "copy.png").write_bytes(paths[3].read_bytes())  # same bytes, another name
    counts = extract(model_dir, tmp_path / "imgs", tmp_path / "store", num_workers=0, flush_every=5, progress=False)
    assert counts == {"images": 16, "encoded": 12, "existing": 0, "deduplicated": 1, "failed": 3}
    errors = [json.loads(line) for line in (tmp_path / "store" / "errors-rank0.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in errors) == ["empty.png", "text.jpg", "truncated.png"]
    store = CodeStore.open(tmp_path / "store")
    assert store.verify().ok
    assert len(store) == 13 and set(store.ids()) == {p.name for p in paths} | {"copy.png"}
    # The stored codes are what model.encode gives; the store costs the documented bits per code.
    model = viq.load(model_dir, components=["encoder"])
    bits = bits_for_levels(model.levels)
    for p, ref in zip(paths, model.encode([str(p) for p in paths])):
        stored = store.get(p.name)
        assert stored.same_codes(ref) and stored.image_size == ref.image_size
        assert store.entry(p.name).length == -(-ref.num_codes * bits // 8)
    assert store.get("copy.png").same_codes(store.get(paths[3].name))
    # A re-run finds everything stored and encodes nothing.
    again = extract(model_dir, tmp_path / "imgs", tmp_path / "store", num_workers=0, progress=False)
    assert again["existing"] == 13 and again["encoded"] == 0


def test_llava_and_webdataset_inputs(model_dir, tmp_path):
    paths = make_images(tmp_path / "imgs", 4, bad=False)
    records = [
        {
            "id": str(i),
            "image": f"imgs/{p.name}",
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
        }
        for i, p in enumerate(paths)
    ]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records + records[:1]))
    assert [it.sample_id for it in list_items(tmp_path / "data.jsonl")] == [f"imgs/{p.name}" for p in paths]
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for p in paths:
            tar.add(p, arcname=f"{p.stem}.png")
    items = list_items(tmp_path / "shard-000.tar")
    assert [it.sample_id for it in items] == [f"shard-000.tar/{p.stem}.png" for p in paths]
    extract(model_dir, tmp_path / "shard-000.tar", tmp_path / "store", num_workers=0, progress=False)
    store = CodeStore.open(tmp_path / "store")
    model = viq.load(model_dir, components=["encoder"])
    assert store.get(f"shard-000.tar/{paths[1].stem}.png").same_codes(model.encode([str(paths[1])])[0])


def _cli(model_dir, inputs, out, *extra):
    return [
        sys.executable,
        "-m",
        "viq",
        "extract",
        "--model",
        str(model_dir),
        "--input",
        str(inputs),
        "--out",
        str(out),
        "--workers",
        "0",
        "--flush-every",
        "3",
        "--batch-tokens",
        "40",
        "-q",
        *extra,
    ]


def test_kill_and_resume_gives_the_uninterrupted_store(model_dir, tmp_path):
    make_images(tmp_path / "imgs", 40, seed=1, bad=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run(_cli(model_dir, tmp_path / "imgs", tmp_path / "ref"), env=env, check=True, capture_output=True)
    rng = random.Random(0)
    for _attempt in range(4):  # killed with SIGKILL at random moments, then re-run
        proc = subprocess.Popen(
            _cli(model_dir, tmp_path / "imgs", tmp_path / "killed"),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(1.5, 5.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    subprocess.run(_cli(model_dir, tmp_path / "imgs", tmp_path / "killed"), env=env, check=True, capture_output=True)
    store = CodeStore.open(tmp_path / "killed")
    assert store.verify().ok
    assert len(store) == 40 and len(set(store.ids())) == 40
    assert store_content(tmp_path / "killed") == store_content(tmp_path / "ref")


def test_two_process_extraction_equals_one(model_dir, tmp_path):
    make_images(tmp_path / "imgs", 10, seed=2, bad=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run(_cli(model_dir, tmp_path / "imgs", tmp_path / "one"), env=env, check=True, capture_output=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29700 + os.getpid() % 200),
        "-m",
        "viq",
        "extract",
        *_cli(model_dir, tmp_path / "imgs", tmp_path / "two")[4:],
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = CodeStore.open(tmp_path / "two")
    assert two.verify().ok
    writers = {two.entry(sid).shard.split("-")[0] for sid in two.ids()}
    assert writers == {"rank0", "rank1"}
    assert store_content(tmp_path / "two") == store_content(tmp_path / "one")


def test_cli_convention_positional_and_old_flags(model_dir, tmp_path, capsys):
    """`viq extract MODEL INPUT -o STORE` like encode/eval-recon; the older --model/--input/--out still
    work; the shared preprocessing and model flags reach the encoder."""
    from viq.cli.main import main

    make_images(tmp_path / "imgs", 6, bad=False)
    common = ["--workers", "0", "-q", "--device", "cpu"]
    assert main(["extract", str(model_dir), str(tmp_path / "imgs"), "-o", str(tmp_path / "new"), *common]) == 0
    assert json.loads(capsys.readouterr().out)["encoded"] == 6
    assert (
        main(
            [
                "extract",
                "--model",
                str(model_dir),
                "--input",
                str(tmp_path / "imgs"),
                "--out",
                str(tmp_path / "old"),
                *common,
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert store_content(tmp_path / "new") == store_content(tmp_path / "old")
    # Preprocessing flags shared with encode: --square 16 gives every image a 1x1-patch grid.
    assert (
        main(
            [
                "extract",
                str(model_dir),
                str(tmp_path / "imgs"),
                "-o",
                str(tmp_path / "sq"),
                "--square",
                "16",
                "--attention",
                "sdpa",
                *common,
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert {tuple(c.grid) for _, c in CodeStore.open(tmp_path / "sq")} == {(1, 1)}
    # The same value twice, or one missing: usage errors naming the problem.
    assert main(["extract", str(model_dir), str(tmp_path / "imgs"), "--model", str(tmp_path), "-o", "x"]) == 2
    assert "MODEL given twice" in capsys.readouterr().err
    assert main(["extract", str(model_dir), "-o", str(tmp_path / "x")]) == 2
    assert "missing INPUT" in capsys.readouterr().err
    assert main(["extract", str(model_dir), str(tmp_path / "imgs"), "--rank", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("viq: error:") and "-o STORE" in err


def test_llava_records_with_their_own_resize(model_dir, tmp_path):
    """A record's "resize" sizes its image in the store as in training; one path under two resizes is refused."""
    from viq.data.llava import LlavaDataset
    from viq.formats.image import padded_grid

    paths = make_images(tmp_path / "imgs", 3, bad=False, seed=3)
    resizes = [[96, 64], None, "64x16"]
    records = [
        {
            "id": str(i),
            "image": {"img_path": f"imgs/{p.name}", "resize": resizes[i]} if resizes[i] else f"imgs/{p.name}",
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
        }
        for i, p in enumerate(paths)
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    extract(model_dir, data, tmp_path / "store", num_workers=0, progress=False)
    store, dataset = CodeStore.open(tmp_path / "store"), LlavaDataset(data)
    for i, p in enumerate(paths):
        pixels = dataset[i].images[0]
        assert store.get(f"imgs/{p.name}").grid == padded_grid(pixels.shape[1], pixels.shape[2])
    assert store.get(f"imgs/{paths[0].name}").grid == (4, 6)  # [96, 64]: 96 wide, 64 high, whatever the source
    # The same file under another resize elsewhere in the data: an error naming both records.
    clash = {**records[0], "id": "again", "image": {"img_path": f"imgs/{paths[0].name}", "resize": "128x16"}}
    data.write_text(data.read_text() + json.dumps(clash) + "\n")
    with pytest.raises(ValueError, match=r"data.jsonl:4 \(id=again\).*data.jsonl:1 \(id=0\)"):
        list_items(data)


def test_one_id_for_two_different_images_is_an_error(model_dir, tmp_path):
    """Rows that give one id to different bytes: the first is stored, the other recorded as an error
    naming both sources -- never stored under the first one's codes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = make_images(tmp_path / "imgs", 3, bad=False, seed=5)
    table = pa.table({"key": ["a", "b", "a"], "jpg": [p.read_bytes() for p in paths]})
    pq.write_table(table, tmp_path / "rows.parquet")
    counts = extract(
        model_dir,
        tmp_path / "rows.parquet",
        tmp_path / "store",
        image_column="jpg",
        id_column="key",
        num_workers=0,
        progress=False,
    )
    assert counts["encoded"] == 2 and counts["failed"] == 1
    errors = [json.loads(line) for line in (tmp_path / "store" / "errors-rank0.jsonl").read_text().splitlines()]
    assert len(errors) == 1 and errors[0]["id"] == "a"
    assert "row 0" in errors[0]["error"] and "row 2" in errors[0]["error"]
    model = viq.load(model_dir, components=["encoder"])
    assert CodeStore.open(tmp_path / "store").get("a").same_codes(model.encode([str(paths[0])])[0])
    # The same bytes under the same id again is no error (a repeated row).
    pq.write_table(pa.table({"key": ["a"], "jpg": [paths[0].read_bytes()]}), tmp_path / "again.parquet")
    again = extract(
        model_dir,
        tmp_path / "again.parquet",
        tmp_path / "store",
        image_column="jpg",
        id_column="key",
        num_workers=0,
        progress=False,
    )
    assert again["failed"] == 0 and again["existing"] == 1
