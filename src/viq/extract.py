"""Offline code extraction: images -> a :class:`viq.store.reader.CodeStore`, on one or many devices, resumable.

::

    viq extract --model M --input photos/ --out codes.store
    torchrun --nproc_per_node 8 -m viq extract --model M --input data.jsonl --out codes.store --dtype bfloat16

* **Inputs**: a folder (recursive; id = path relative to the folder), a LLaVA JSON/JSONL file (every
  distinct image path of its records; id = the path as written, so training can find its codes),
  or WebDataset ``.tar`` shards (id = ``<tar name>/<member name>``).
* **Sharding**: under ``torchrun`` rank r of W takes items r, r+W, ... of the sorted item list and
  writes its own store shards (writer ``rank<r>``): no locks, no shared files.
* **Pipeline**: DataLoader workers read, hash (sha256 of the file bytes) and preprocess images in
  parallel; the main process drops duplicates and hands the rest to :meth:`ViQModel.encode_stream`,
  which packs them up to ``batch_tokens`` patch tokens per forward pass.
* **Resumable**: shards are finalised atomically every ``flush_every`` images; a re-run skips every id
  already in the store, so a run killed at any moment (even mid-shard) finishes with each image stored
  exactly once and nothing corrupt.
* **Deduplication**: an image whose bytes were already stored (same sha256) is not encoded again;
  its codes are copied under the new id.
* **Errors**: unreadable images (and images whose forward pass fails) are recorded in ``errors-rank<r>.jsonl`` beside the shards and
  skipped; the summary counts them.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from viq.formats.codes import Codes
from viq.formats.image import IMAGE_EXTENSIONS
from viq.store.ids import image_id, tar_member_id

log = logging.getLogger(__name__)

__all__ = ["extract", "list_items", "Item"]


@dataclass(frozen=True)
class Item:
    """One image to extract: its id in the store and where its bytes are."""

    sample_id: str
    path: str
    member: str | None = None  # tar member name for WebDataset shards


def list_items(source: str | os.PathLike, image_root: str | None = None) -> list[Item]:
    """All images of an input (folder, LLaVA JSON/JSONL, .tar or a folder/list of .tar), sorted by id."""
    source = Path(source)
    items: dict[str, Item] = {}
    if source.is_dir() and not any(source.glob("*.tar")):
        for p in sorted(source.rglob("*")):
            rel = p.relative_to(source)
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not any(s.startswith(".") for s in rel.parts):
                sid = image_id(p, source)
                items[sid] = Item(sid, str(p))
    elif source.suffix == ".tar" or (source.is_dir() and any(source.glob("*.tar"))):
        tars = [source] if source.suffix == ".tar" else sorted(source.glob("*.tar"))
        for tar_path in tars:
            with tarfile.open(tar_path) as tar:
                for member in tar.getmembers():
                    if member.isfile() and Path(member.name).suffix.lower() in IMAGE_EXTENSIONS:
                        sid = tar_member_id(tar_path, member.name)
                        items[sid] = Item(sid, str(tar_path), member.name)
    elif source.suffix in (".json", ".jsonl"):
        from viq.data.llava import LlavaDataset

        dataset = LlavaDataset(source, image_root=image_root)
        root = Path(image_root) if image_root else source.parent
        for i in range(len(dataset)):
            for path in dataset.image_paths(i):
                # the id is the path relative to the image root (as a record writes it), so training
                # finds an image's codes by the same string
                sid = image_id(path, root)
                items.setdefault(sid, Item(sid, str(path)))
    elif not source.exists():
        raise FileNotFoundError(f"{source}: no such input")
    else:
        raise ValueError(f"{source}: expected a folder of images, a LLaVA .json/.jsonl file or WebDataset .tar shards")
    return [items[k] for k in sorted(items)]


class _ReadDataset(torch.utils.data.Dataset):
    """Worker side: read bytes, hash, preprocess. Never raises: errors travel as results."""

    def __init__(self, items: list[Item], preprocess) -> None:
        self.items, self.preprocess = items, preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from viq.formats.image import preprocess

        item = self.items[i]
        out: dict[str, Any] = {"item": item}
        try:
            if item.member is None:
                data = Path(item.path).read_bytes()
            else:
                with tarfile.open(item.path) as tar:
                    f = tar.extractfile(item.member)
                    if f is None:
                        raise ValueError("not a regular file in the tar")
                    data = f.read()
            out["hash"] = hashlib.sha256(data).hexdigest()
            name = item.path if item.member is None else f"{item.path}:{item.member}"
            try:
                prepared = preprocess(data, self.preprocess)
            except Exception as e:  # re-label the "<bytes>" source with the real name
                raise type(e)(str(e).replace("<bytes>", name)) if isinstance(e, ValueError) else e
            # named after the file, so that an encoding error from ViQModel.encode_stream names it too
            out["prepared"] = dataclasses.replace(prepared, source=name)
        except Exception as e:  # noqa: BLE001 - one bad image must not stop the run
            out["error"] = f"{type(e).__name__}: {e}"
        return out


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def extract(
    model_path: str | os.PathLike,
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    image_root: str | None = None,
    device: str = "auto",
    dtype: torch.dtype = torch.float32,
    batch_tokens: int = 8192,
    num_workers: int = 2,
    preprocess=None,
    flush_every: int = 256,
    entropy_coding: bool = False,
    progress: bool = True,
    model=None,
    return_timing: bool = False,
) -> dict[str, int]:
    """Extract the codes of every image of ``source`` into the store ``out`` (created if needed).

    Returns counts: ``images`` (this rank's share), ``encoded``, ``existing`` (already stored),
    ``deduplicated`` (same bytes as a stored image), ``failed``.
    """
    import viq
    from viq.formats.image import PreprocessConfig
    from viq.store.reader import CodeStore

    rank, world = _rank_world()
    if device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    if model is None:
        model = viq.load(model_path, device=device, dtype=dtype, components=["encoder"])
    pre = preprocess or PreprocessConfig(patch_size=model.patch_size)
    store = CodeStore.create(out, levels=model.levels, codes_per_patch=model.config.head.codes_per_patch,
                             patch_size=model.patch_size, model_fingerprint=model.fingerprint(),
                             entropy_coding=entropy_coding, exist_ok=True)
    items = list_items(source, image_root)[rank::world]
    done = set(store.ids())
    todo = [it for it in items if it.sample_id not in done]
    counts = {"images": len(items), "encoded": 0, "existing": len(items) - len(todo), "deduplicated": 0, "failed": 0}
    # Wall time of the whole loop and of the model calls alone: their ratio is how busy the data path
    # keeps the accelerator (reported by bench/extract_throughput.py).
    timing = {"wall_s": 0.0, "encode_s": 0.0}
    started = time.perf_counter()
    errors_path = Path(out) / f"errors-rank{rank}.jsonl"
    loader = torch.utils.data.DataLoader(_ReadDataset(todo, pre), batch_size=None, num_workers=num_workers,
                                         prefetch_factor=8 if num_workers else None)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="extract", unit="img")
    fingerprint = model.fingerprint()

    with store.writer(name=f"rank{rank}") as writer:
        since_flush = 0
        recent: dict[str, Codes] = {}  # content hash -> codes added since the last flush
        waiting: dict[str, list[Item]] = {}  # content hash -> duplicates of an image being encoded
        queued: collections.deque[dict[str, Any]] = collections.deque()  # sent to encode_stream, in order
        reading_s = 0.0  # time spent in to_encode() (reading, dedup, store writes), inside the stream's wall time

        def add(item: Item, codes: Codes, content_hash: str) -> None:
            nonlocal since_flush
            codes = Codes(codes.indices, codes.levels, image_size=codes.image_size, patch_size=codes.patch_size,
                          metadata={"model": fingerprint, "source": item.path})
            writer.add(item.sample_id, codes, source=item.path, content_hash=content_hash)
            recent[content_hash] = codes
            since_flush += 1
            if bar is not None:
                bar.update(1)

        def fail(item: Item, error: str) -> None:
            counts["failed"] += 1
            with open(errors_path, "a") as f:
                f.write(json.dumps({"id": item.sample_id, "source": item.path, "error": error}) + "\n")
            log.warning("%s: %s", item.path, error)
            if bar is not None:
                bar.update(1)

        def maybe_flush() -> None:
            # only between packs, when no image is being encoded: its duplicates wait in `waiting`
            nonlocal since_flush
            if since_flush >= flush_every and not queued:
                writer.flush()
                recent.clear()
                since_flush = 0

        def to_encode():
            """The loader's images that need encoding; read errors and duplicates are handled here."""
            nonlocal reading_s
            t0 = time.perf_counter()
            for result in loader:
                item = result["item"]
                if "error" in result:
                    fail(item, result["error"])
                    maybe_flush()
                    continue
                h = result["hash"]
                # Same bytes as an image already stored, added, or being encoded: no second encode.
                known = recent.get(h)
                if known is None:
                    stored_as = store.has_hash(h)
                    known = store.get(stored_as) if stored_as is not None else None
                if known is not None:
                    add(item, known, h)
                    counts["deduplicated"] += 1
                elif h in waiting:
                    waiting[h].append(item)
                else:
                    waiting[h] = []
                    queued.append(result)
                    reading_s += time.perf_counter() - t0
                    yield result["prepared"]
                    t0 = time.perf_counter()
                maybe_flush()
            reading_s += time.perf_counter() - t0

        stream_s = 0.0
        stream = model.encode_stream(to_encode(), batch_tokens=batch_tokens)
        while True:
            t0 = time.perf_counter()
            codes = next(stream, None)  # Codes are on the CPU: the device work is done
            stream_s += time.perf_counter() - t0
            if codes is None:
                break
            result = queued.popleft()
            item, h = result["item"], result["hash"]
            twins = waiting.pop(h, [])
            if isinstance(codes, Exception):
                for it in (item, *twins):
                    fail(it, f"{type(codes).__name__}: {codes}")
            else:
                add(item, codes, h)
                counts["encoded"] += 1
                for twin in twins:
                    add(twin, codes, h)
                    counts["deduplicated"] += 1
            maybe_flush()
        timing["encode_s"] = stream_s - reading_s
    if bar is not None:
        bar.close()
    timing["wall_s"] = time.perf_counter() - started
    log.info("rank %d: %s (%.1f s, %.0f%% of it encoding)", rank, counts, timing["wall_s"],
             100 * timing["encode_s"] / max(timing["wall_s"], 1e-9))
    if return_timing:
        return {**counts, **timing}
    return counts
