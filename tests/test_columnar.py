"""Parquet inputs: extraction from bytes / path / {bytes, path} struct columns (with a named id column)
gives the codes of the same images read from a folder; kill -9 then resume over several files gives
the uninterrupted store; training data from a conversations column equals the same JSONL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from test_extract import _cli, make_images, store_content
from viq.data.columnar import list_parts
from viq.data.llava import LlavaDataset
from viq.extract import DONE_FILE, extract
from viq.store.reader import CodeStore
from viq.train.config import TrainConfig
from viq.train.data import build_dataset


@pytest.fixture(scope="module")
def folder(model_dir, tmp_path_factory):
    """10 images in a folder and the store of their folder extraction (ids ``img000.png``, ...)."""
    root = tmp_path_factory.mktemp("data")
    images = make_images(root / "imgs", 10, seed=21, bad=False)
    extract(model_dir, root / "imgs", root / "folder-store", num_workers=0, progress=False)
    return root, images, store_content(root / "folder-store")


IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _table(images: list[Path], kind: str) -> pa.Table:
    names = [p.name for p in images]
    data = [p.read_bytes() for p in images]
    if kind == "bytes":
        return pa.table({"jpg": pa.array(data, pa.binary()), "key": names})
    if kind == "path":
        return pa.table({"image": [f"imgs/{n}" for n in names]})
    return pa.table(
        {"image": pa.array([{"bytes": b, "path": n} for b, n in zip(data, names)], IMAGE_STRUCT), "key": names}
    )


@pytest.mark.parametrize(
    "kind, columns",
    [
        ("bytes", {"image_column": "jpg", "id_column": "key"}),
        ("path", {}),  # image paths relative to the table's folder (the default --image-root)
        ("struct", {"id_column": "key"}),  # datasets' Image feature
    ],
)
def test_parquet_extraction_equals_folder_extraction(kind, columns, model_dir, folder, tmp_path):
    root, images, expected = folder
    table = root / f"{kind}.parquet"
    pq.write_table(_table(images, kind), table, row_group_size=4)
    assert len(list_parts(table)) == 3  # row groups of 4, 4, 2 rows
    counts = extract(model_dir, table, tmp_path / "store", num_workers=0, progress=False, **columns)
    assert counts == {"images": 10, "encoded": 10, "existing": 0, "deduplicated": 0, "failed": 0}
    assert CodeStore.open(tmp_path / "store").verify().ok
    prefix = "imgs/" if kind == "path" else ""  # paths are resolved against, and ids relative to, the table's folder
    assert store_content(tmp_path / "store") == {prefix + k: v for k, v in expected.items()}


def test_parquet_without_id_column_uses_file_and_row(model_dir, folder, tmp_path):
    _, images, expected = folder
    pq.write_table(_table(images, "bytes").drop(["key"]), tmp_path / "t.parquet", row_group_size=3)
    extract(model_dir, tmp_path / "t.parquet", tmp_path / "store", image_column="jpg", num_workers=0, progress=False)
    got = store_content(tmp_path / "store")
    assert got == {f"t.parquet/{i}": expected[p.name] for i, p in enumerate(images)}
    with pytest.raises(ValueError, match="no column 'photo'"):
        extract(model_dir, tmp_path / "t.parquet", tmp_path / "s2", image_column="photo", num_workers=0, progress=False)


def test_kill_and_resume_parquet_gives_the_uninterrupted_store(model_dir, tmp_path):
    images = make_images(tmp_path / "imgs", 40, seed=22, bad=False)
    data = tmp_path / "table"
    data.mkdir()
    for f in range(4):  # 4 files of 10 rows in row groups of 5: 8 units
        chunk = images[f * 10 : (f + 1) * 10]
        pq.write_table(
            pa.table({"png": pa.array([p.read_bytes() for p in chunk], pa.binary()), "name": [p.stem for p in chunk]}),
            data / f"part-{f}.parquet",
            row_group_size=5,
        )
    extra = ["--image-column", "png", "--id-column", "name"]
    extract(
        model_dir,
        data,
        tmp_path / "ref",
        image_column="png",
        id_column="name",
        num_workers=0,
        flush_every=3,
        batch_tokens=40,
        progress=False,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    rng = random.Random(2)
    for _ in range(4):  # SIGKILL at random moments, then re-run
        proc = subprocess.Popen(
            _cli(model_dir, data, tmp_path / "killed", *extra),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(1.5, 5.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    subprocess.run(_cli(model_dir, data, tmp_path / "killed", *extra), env=env, check=True, capture_output=True)
    store = CodeStore.open(tmp_path / "killed")
    assert store.verify().ok
    assert len(store) == 40 and len(set(store.ids())) == 40
    assert sorted(store.ids()) == sorted(p.stem for p in images)
    assert store_content(tmp_path / "killed") == store_content(tmp_path / "ref")
    done = set()
    for path in (tmp_path / "killed").glob("done-units-rank*.jsonl"):
        done |= {json.loads(line)["unit"] for line in path.read_text().splitlines()}
    assert done == {f"part-{f}.parquet#{g}" for f in range(4) for g in range(2)}
    assert (tmp_path / "killed" / DONE_FILE.format(rank=0)).is_file()


# -- training data -------------------------------------------------------------------------------


def _records(images: list[Path]) -> list[dict]:
    records = []
    for i, p in enumerate(images[:6]):
        turns = [
            {"from": "human", "value": f"<image>\nWhat is picture {i}?"},
            {"from": "gpt", "value": f"Picture {i}."},
        ]
        if i % 2:
            turns += [{"from": "human", "value": "And then?"}, {"from": "gpt", "value": "Nothing."}]
        records.append({"id": f"s{i}", "image": f"imgs/{p.name}", "conversations": turns})
    records.append(
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    )
    return records


def _same_samples(a: LlavaDataset, b) -> None:
    assert len(a) == len(b) == 7
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert (x.id, x.messages) == (y.id, y.messages)
        assert len(x.images) == len(y.images)
        assert all(torch.equal(u, v) for u, v in zip(x.images, y.images))


def test_training_data_from_parquet_equals_jsonl(folder):
    root, images, _ = folder
    records = _records(images)
    jsonl = root / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    # default column names, conversations as a list of structs, row groups of 3
    pq.write_table(
        pa.table(
            {
                "id": [r["id"] for r in records],
                "image": [r.get("image") for r in records],
                "conversations": pa.array([r["conversations"] for r in records], pa.list_(turn)),
            }
        ),
        root / "train.parquet",
        row_group_size=3,
    )
    # other column names, conversations as JSON text, named from the recipe
    pq.write_table(
        pa.table(
            {
                "key": [r["id"] for r in records],
                "picture": [r.get("image") for r in records],
                "dialog": [json.dumps(r["conversations"]) for r in records],
            }
        ),
        root / "named.parquet",
    )
    reference = LlavaDataset(jsonl)
    _same_samples(reference, LlavaDataset(root / "train.parquet"))
    cfg = TrainConfig.from_dict(
        {
            "stage": "stage2_2",
            "data": {
                "train": str(root / "named.parquet"),
                "conversations_column": "dialog",
                "image_column": "picture",
                "id_column": "key",
            },
        }
    )
    _same_samples(reference, build_dataset(cfg.data.train, cfg, cfg.data.max_pixels))
    default = TrainConfig()
    assert (default.data.conversations_column, default.data.image_column, default.data.id_column) == (
        "conversations",
        "image",
        "id",
    )


def test_codes_stage_reads_image_bytes_by_the_extracted_id(model_dir, folder, tmp_path):
    """Images stored as bytes in the table: `viq extract --id-column` and data.id_column name the same
    column, so the mllm stage finds each row's codes."""
    _, images, expected = folder
    records = _records(images)[:6]
    table = tmp_path / "train.parquet"
    pq.write_table(
        pa.table(
            {
                "uid": [p.name for p in images[:6]],
                "img": pa.array([p.read_bytes() for p in images[:6]], pa.binary()),
                "conversations": [json.dumps(r["conversations"]) for r in records],
            }
        ),
        table,
    )
    extract(model_dir, table, tmp_path / "codes", image_column="img", id_column="uid", num_workers=0, progress=False)
    cfg = TrainConfig.from_dict(
        {
            "stage": "mllm",
            "data": {"train": str(table), "codes": str(tmp_path / "codes"), "image_column": "img", "id_column": "uid"},
        }
    )
    dataset = build_dataset(cfg.data.train, cfg, cfg.data.max_pixels)
    assert len(dataset) == 6
    for i in range(6):
        sample = dataset[i]
        assert sample.id == images[i].name
        assert [c.flat().tolist() for c in sample.codes] == [expected[images[i].name]]
