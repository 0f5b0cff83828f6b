"""Data plumbing for training: the stage's dataset, the progressive-resolution schedule, a
deterministic sharded batch order, collation into TrainBatch, and the stream of micro-batches.

The order of micro-batches is a pure function of (seed, epoch, rank, world size): each epoch is a
seeded permutation, padded by wrap-around to a multiple of the world size (like
``DistributedSampler``) and dealt out round-robin, so rank r sees ``perm[r::world]`` — disjoint
shares whose union, step by step, is exactly what one process with ``world`` times the batch size
sees. Any micro-batch can be reached by its global index, which is all a resumed run needs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from viq.data.check import check_images
from viq.data.codes import LlavaCodesDataset
from viq.data.columnar import is_columnar_source
from viq.data.folder import ImageFolderDataset
from viq.data.llava import LlavaDataset
from viq.formats.image import PreprocessConfig, padded_grid, scheduled_max_pixels
from viq.train.config import TrainConfig
from viq.train.model import TrainBatch
from viq.train.parallel import Dist

log = logging.getLogger(__name__)

#: A conversation longer than this many characters per ``llm.max_length`` token is refused before it
#: is tokenised (BPE tokens of real text average 3-5 characters; 32 leaves room for long runs).
MAX_CHARS_PER_TOKEN = 32

__all__ = [
    "ShardedBatchOrder",
    "Collator",
    "BatchStream",
    "build_dataset",
    "dataset_images",
    "max_pixels_at",
    "spread_indices",
]


class ShardedBatchOrder:
    """Infinite, resumable sequence of micro-batches (lists of dataset indices) for one rank.

    Args:
        size: dataset length.
        batch_size: samples per micro-batch on this rank.
        rank, world: this process and the number of processes.
        seed: permutation seed (the epoch is added).
        start: global micro-batch index to start from (resume).
        shuffle: permute each epoch (False: dataset order).
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        start: int = 0,
        shuffle: bool = True,
    ) -> None:
        if size <= 0:
            raise ValueError("the training set is empty")
        self.size, self.batch_size, self.rank, self.world = size, batch_size, rank, world
        self.seed, self.start, self.shuffle = seed, start, shuffle
        per_rank = -(-size // world)
        # Drop the incomplete last batch so every rank runs the same number of steps per epoch.
        self.batches_per_epoch = max(1, per_rank // batch_size)

    def epoch_indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        total = -(-self.size // self.world) * self.world
        order = (order * (total // self.size + 1))[:total]
        shard = order[self.rank :: self.world]
        while len(shard) < self.batch_size:  # tiny datasets: repeat to fill one batch
            shard = shard + shard
        return shard

    def batch(self, index: int) -> list[int]:
        epoch, pos = divmod(index, self.batches_per_epoch)
        shard = self.epoch_indices(epoch)
        return shard[pos * self.batch_size : (pos + 1) * self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        index = self.start
        while True:
            yield self.batch(index)
            index += 1


class Collator:
    """Samples -> :class:`TrainBatch`: tokenises conversations (answer-only labels) and lists images.

    ``tokenizer`` is a :class:`viq.mllm.chat.ChatTokenizer` (None for image-only stages). Items may be
    ``viq.data.llava.Sample`` (conversations + images) or ``viq.data.folder.ImageItem`` (images).
    ``None`` items (samples skipped with ``on_error: skip``) are dropped and counted.
    """

    def __init__(self, tokenizer=None, max_length: int = 4096, *, image_tokens=None, patch_size: int = 16) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        #: grid (h, w) -> number of LLM tokens the projector makes for it (None: not checked)
        self.image_tokens = image_tokens
        self.patch_size = patch_size

    def _llm_length(self, text_tokens: int, images: list[torch.Tensor], codes: list = ()) -> int:
        if self.image_tokens is None:
            return text_tokens
        p = self.patch_size
        grids = [padded_grid(x.shape[1], x.shape[2], p) for x in images] + [c.grid for c in codes]
        # each image replaces its one placeholder token by the projector's tokens
        return text_tokens + sum(self.image_tokens(g) - 1 for g in grids)

    def __call__(self, items: Sequence) -> TrainBatch:
        images: list[torch.Tensor] = []
        codes: list = []
        conversations, per_sample, ids = [], [], []
        for item in items:
            if item is None:
                continue
            if hasattr(item, "messages"):
                item_codes = getattr(item, "codes", None) or []
                if self.tokenizer is not None:
                    # Bounded before tokenising: an 8 MB turn would cost seconds and GBs only to be refused.
                    chars = sum(len(content) for _, content in item.messages)
                    if chars > MAX_CHARS_PER_TOKEN * self.max_length:
                        raise ValueError(
                            f"{item.where} (id={item.id}): {chars} characters of text cannot fit llm.max_length="
                            f"{self.max_length} tokens (refused before tokenising: more than {MAX_CHARS_PER_TOKEN} "
                            f"characters a token)"
                        )
                    tok = self.tokenizer.encode(item.messages)
                    input_ids, labels = tok.input_ids, tok.labels
                    length = self._llm_length(len(input_ids), item.images, item_codes)
                    if length > self.max_length:
                        raise ValueError(
                            f"{item.where} (id={item.id}): {length} LLM tokens (text + image) exceed "
                            f"llm.max_length={self.max_length}; lower data.max_pixels or raise the limit"
                        )
                    conversations.append((input_ids, labels))
                images.extend(item.images)
                codes.extend(item_codes)
                per_sample.append(len(item.images) + len(item_codes))
                ids.append(item.id)
            else:
                images.append(item.pixels)
                per_sample.append(1)
                ids.append(getattr(item, "path", str(len(ids))))
        return TrainBatch(
            images=images, codes=codes, conversations=conversations, images_per_sample=per_sample, ids=ids
        )


def build_dataset(path: str, cfg: TrainConfig, max_pixels: int, *, progress: bool = False):
    """The dataset at ``path`` for the recipe's stage: LLaVA conversations (a JSON/JSONL file, or
    Parquet / Arrow data whose columns are named by ``data.conversations_column``, ``data.image_column``
    and ``data.id_column``), an image folder (a directory), or conversations with stored codes (stages
    that read codes). With ``data.check_images`` every image is checked when the data is first built
    (:func:`viq.data.check.check_images`; ``progress``: show a bar)."""

    columns = {
        "conversations_column": cfg.data.conversations_column,
        "image_column": cfg.data.image_column,
        "id_column": cfg.data.id_column,
    }  # used by columnar data only
    if cfg.spec.data == "codes":
        if not cfg.data.codes:
            raise ValueError(f"stage {cfg.stage} needs data.codes: the code store made by viq extract")
        return LlavaCodesDataset(
            path, cfg.data.codes, image_root=cfg.data.image_root, on_error=cfg.data.on_error, columns=columns
        )

    pre = PreprocessConfig(min_pixels=cfg.data.min_pixels, max_pixels=max_pixels)
    if Path(path).is_dir() and not is_columnar_source(path):
        dataset = ImageFolderDataset(path, preprocess=pre, on_error=cfg.data.on_error)
    else:
        dataset = LlavaDataset(
            path, image_root=cfg.data.image_root, preprocess=pre, on_error=cfg.data.on_error, columns=columns
        )
    if cfg.data.check_images:
        _checked(dataset, path, cfg, progress)
    return dataset


#: (data path, image root, on_error) -> the image paths found unreadable: a dataset rebuilt by the
#: progressive-resolution schedule is not scanned again.
_CHECKED: dict[tuple, frozenset[str]] = {}


def _checked(dataset, path: str, cfg: TrainConfig, progress: bool) -> None:
    """:func:`viq.data.check.check_images` once per data file and process; later builds of the same
    data drop the same samples without reading the images again."""

    key = (str(path), cfg.data.image_root, cfg.data.on_error)
    bad = _CHECKED.get(key)
    if bad is None:
        before = (
            set(dataset.files)
            if isinstance(dataset, ImageFolderDataset)
            else {r.path for i in range(len(dataset)) for r in dataset.record(i).images}
        )
        check_images(dataset, progress=progress)
        after = (
            set(dataset.files)
            if isinstance(dataset, ImageFolderDataset)
            else {r.path for i in range(len(dataset)) for r in dataset.record(i).images}
        )
        _CHECKED[key] = frozenset(before - after)
    elif bad:
        if isinstance(dataset, ImageFolderDataset):
            dataset.files = [f for f in dataset.files if f not in bad]
        else:
            dataset.drop(
                [i for i in range(len(dataset)) if any(r.path in bad for r in dataset.record(i).images)],
                reason="unreadable image",
            )


def spread_indices(n: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(n)`` (all of them when ``n <= count``), increasing:
    a collection sorted by source or task is not read only from its head."""
    return list(range(n)) if n <= count else [i * n // count for i in range(count)]


def dataset_images(dataset: Any, count: int) -> list[torch.Tensor]:
    """Up to ``count`` preprocessed images (3, H, W) of a training dataset, from samples spread evenly
    over it (a dataset sorted by source or task is not read only from its head). Items are
    :class:`viq.data.llava.Sample` (``images``) or :class:`viq.data.folder.ImageItem` (``pixels``);
    ``None`` items (skipped samples) are passed over."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    images: list[torch.Tensor] = []
    for i in spread_indices(len(dataset), count):
        item = dataset[i]
        if item is None:
            continue
        images.extend(item.images if hasattr(item, "images") else [item.pixels])
        if len(images) >= count:
            break
    return images[:count]


def max_pixels_at(cfg: TrainConfig, step: int) -> int:
    """The progressive-resolution schedule: the max_pixels of the last phase started by ``step``."""
    return scheduled_max_pixels(cfg.data.max_pixels, cfg.data.resolution_schedule, step)


class BatchStream:
    """Micro-batches for this rank from global micro-batch ``start`` on, rebuilt when the
    progressive-resolution schedule changes the preprocessing. ``index`` is the next global
    micro-batch (saved in checkpoints). ``built``: ``(max_pixels, dataset)``, the training data already
    built (and checked) at that resolution, used instead of building it again when the stream starts
    there."""

    def __init__(
        self,
        cfg: TrainConfig,
        dist_info: Dist,
        collator: Collator,
        start: int,
        built: tuple[int, torch.utils.data.Dataset] | None = None,
    ) -> None:
        self.cfg, self.dist, self.collator = cfg, dist_info, collator
        self.index = start
        self._iter: Any = None  # an iterator over the DataLoader, made at the first next()
        self._pixels: int | None = None
        self._built = built

    def next(self, step: int) -> TrainBatch:
        pixels = max_pixels_at(self.cfg, step)
        if self._iter is None or pixels != self._pixels:
            built, self._built = self._built, None
            dataset = (
                built[1]
                if built is not None and built[0] == pixels
                else build_dataset(self.cfg.data.train, self.cfg, pixels)
            )
            order = ShardedBatchOrder(
                len(dataset),
                self.cfg.train.batch_size,
                rank=self.dist.rank,
                world=self.dist.world,
                seed=self.cfg.train.seed,
                start=self.index,
            )
            # Its own generator: creating a DataLoader iterator draws a seed, which must not consume the
            # global RNG (that would shift dropout noise after a resume).
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_sampler=order,
                collate_fn=self.collator,
                num_workers=self.cfg.data.num_workers,
                generator=torch.Generator().manual_seed(self.cfg.train.seed),
            )
            self._iter, self._pixels = iter(loader), pixels
        self.index += 1
        return next(self._iter)
