"""Writing and reading a synthetic QA set: :func:`generate` and :func:`load_split`.

Output layout (:func:`generate`)
--------------------------------
::

    out_dir/
      meta.json                 seed, generator version, fonts, arguments, counts per split/task
      train.jsonl val.jsonl test.jsonl
      images/<split>/<id>.png   RGB PNG at native size (sides in [min_side, max_side], 1:4..4:1)

One JSON object per line (LLaVA conversation format)::

    {"id": "train-000012", "image": "images/train/train-000012.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is written in the image?"},
                       {"from": "gpt", "value": "Kx7pQ"}],
     "task": "ocr", "question": "What is written in the image?", "answer": "Kx7pQ"}

* ``image`` is relative to ``out_dir``; text-only samples have no ``image`` key and no
  ``<image>`` token. Image samples have exactly one ``<image>`` token, at the start of the first
  human turn.
* Multi-turn samples (about 10 %) have two human/gpt rounds about the same image.
* ``question``/``answer`` are the *last* round (without ``<image>``): the reference for scoring
  a model's reply to the final turn given the earlier turns. Compare with
  :func:`viq.demo.synthetic.scoring.score`.

Determinism
-----------
Every sample uses its own ``random.Random`` seeded from a SHA-256 of ``(version, seed, split,
index, attempt)``; the order of tasks within a split comes from a similar per-split RNG. Nothing
depends on the global RNGs, hash randomisation, time or dict ordering, PNGs are written with fixed
zlib parameters and JSON with fixed formatting, so re-running with the same arguments (and the
same Pillow/FreeType/zlib/numpy) reproduces every file byte for byte. Splits never share an image
(nor a text-only question): a sample that collides with an earlier one is redrawn with
``attempt + 1``; splits are generated in the order train, val, test.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image, features

from viq._io import atomic_write
from viq.demo.synthetic.draw import font_label, resolve_fonts
from viq.demo.synthetic.tasks import (
    ALL_TASKS,
    KNOWN_TASKS,
    QA,
    TASK_MIN_SIDE,
    TASKS,
    TEXT_TASK,
    task_arithmetic,
)
from viq.mllm.chat import IMAGE_TOKEN

logger = logging.getLogger(__name__)

__all__ = ["GENERATOR_VERSION", "SPLITS", "generate", "load_split"]

#: Bump whenever the output for given arguments changes (it is also mixed into every seed).
GENERATOR_VERSION = "1.0"
SPLITS = ("train", "val", "test")
#: Fixed zlib level so the PNG bytes never depend on Pillow's default. Level 1: the noisy images
#: compress only ~13 % worse than at level 6 but encode ~3x faster (encoding dominates run time).
PNG_COMPRESS_LEVEL = 1

# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _derive_seed(*parts: object) -> int:
    """64-bit seed from a SHA-256 of the parts (stable across processes, unlike ``hash``)."""
    text = "/".join(str(p) for p in ("viq-synthetic", GENERATOR_VERSION, *parts))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def _sample_size(rng: random.Random, min_side: int, max_side: int, floor: int = 0) -> tuple[int, int]:
    """Random ``(width, height)`` with both sides in ``[max(min_side, floor), max_side]`` (floor
    capped at ``max_side``): long side uniform, aspect ratio log-uniform up to 4:1, random
    orientation."""
    lo = min(max(min_side, floor), max_side)
    long_side = rng.randint(lo, max_side)
    max_aspect = min(4.0, long_side / lo)
    aspect = math.exp(rng.uniform(0.0, math.log(max_aspect))) if max_aspect > 1.0 else 1.0
    short_side = min(long_side, max(lo, round(long_side / aspect)))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def _schedule(
    n: int, seed: int, split: str, tasks: Sequence[str], text_fraction: float, weights: Sequence[float] | None = None
) -> list[str]:
    """Task of every index of a split: ``round(n * text_fraction)`` text-only samples at random
    positions, image tasks balanced (counts differ by at most one) in shuffled order, or, with
    ``weights`` (one per task), in proportion to them (largest remainders, ties to the earlier task)."""
    rng = random.Random(_derive_seed(seed, split, "schedule"))
    n_text = min(n, math.floor(n * text_fraction + 0.5))
    m = n - n_text
    if weights is None:
        plan = [tasks[j % len(tasks)] for j in range(m)]
    else:
        total = float(sum(weights))
        exact = [m * w / total for w in weights]
        counts = [math.floor(x) for x in exact]
        for j in sorted(range(len(tasks)), key=lambda j: (counts[j] - exact[j], j))[: m - sum(counts)]:
            counts[j] += 1
        plan = [t for t, c in zip(tasks, counts) for _ in range(c)]
    plan += [TEXT_TASK] * n_text
    rng.shuffle(plan)
    return plan


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buf.getvalue()


def _conversation(turns: Sequence[QA], with_image: bool) -> list[dict[str, str]]:
    conv: list[dict[str, str]] = []
    for t, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": f"{IMAGE_TOKEN}\n{q}" if with_image and t == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return conv


def _make_sample(
    split: str,
    index: int,
    task: str,
    seed: int,
    attempt: int,
    *,
    min_side: int,
    max_side: int,
    fonts: Sequence[str],
    multi_turn_fraction: float,
) -> tuple[dict[str, Any], Image.Image | None, str]:
    """One record (+ image) and its uniqueness key, from the RNG of ``(seed, split, index, attempt)``."""
    rng = random.Random(_derive_seed(seed, split, index, attempt))
    sample_id = f"{split}-{index:06d}"
    if task == TEXT_TASK:
        q, a = task_arithmetic(rng)
        record = {
            "id": sample_id,
            "conversations": _conversation([(q, a)], False),
            "task": task,
            "question": q,
            "answer": a,
        }
        return record, None, "text:" + q
    size = _sample_size(rng, min_side, max_side, TASK_MIN_SIDE.get(task, 0))
    img, qa = TASKS[task](rng, size, fonts=fonts)
    if img.size != size or img.mode != "RGB" or not qa:
        raise AssertionError(f"task {task} returned {img.mode} {img.size} with {len(qa)} QA for size {size}")
    turns = qa[:2] if (len(qa) >= 2 and rng.random() < multi_turn_fraction) else qa[:1]
    record = {
        "id": sample_id,
        "image": f"images/{split}/{sample_id}.png",
        "conversations": _conversation(turns, True),
        "task": task,
        "question": turns[-1][0],
        "answer": turns[-1][1],
    }
    key = "image:" + hashlib.sha256(f"{size}".encode() + img.tobytes()).hexdigest()
    return record, img, key


def generate(
    out_dir: str | os.PathLike[str],
    *,
    num_train: int = 2000,
    num_val: int = 200,
    num_test: int = 200,
    seed: int = 0,
    tasks: Sequence[str] = ALL_TASKS,
    min_side: int = 64,
    max_side: int = 384,
    fonts: Sequence[str | os.PathLike[str]] | None = None,
    overwrite: bool = False,
    text_only_fraction: float = 0.03,
    multi_turn_fraction: float = 0.1,
    task_weights: dict[str, float] | None = None,
    task_max_side: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Write the synthetic dataset to ``out_dir`` (layout in the module docstring); return its meta.

    Args:
        out_dir: output directory; created if missing. Must be empty unless ``overwrite``.
        num_train, num_val, num_test: samples per split (text-only samples included).
        seed: dataset seed (any int); every sample is derived from ``(seed, split, index)``.
        tasks: image tasks to use (subset of :data:`~viq.demo.synthetic.tasks.KNOWN_TASKS`: the
            default :data:`ALL_TASKS` and the easy ``SIMPLE_TASKS``; stored in canonical order).
        min_side, max_side: bounds in px for both image sides (``32 <= min_side <= max_side``);
            chart/document/count/locate images use a larger lower bound (:data:`TASK_MIN_SIDE`)
            when ``max_side`` allows. Aspect ratios are at most 4:1.
        fonts: font files or names (see :func:`resolve_fonts`); ``None`` = DejaVu defaults.
        overwrite: allow a non-empty ``out_dir``; files this function writes are replaced and
            stale ``images/<split>/*.png`` not referenced any more are removed. Nothing else is.
        text_only_fraction: share of text-only (arithmetic) samples per split (rounded).
        multi_turn_fraction: probability that an image sample gets two QA rounds.
        task_weights: relative share of each task among the image samples (tasks of ``tasks`` not
            listed get 0; counts are exact up to rounding). ``None``: every task equally often.
            Recorded in ``meta.json`` only when given.
        task_max_side: per-task ``max_side`` (e.g. larger pages for chart/document in a set of
            small images); tasks not listed use ``max_side``. Recorded only when given.

    Returns:
        The dict also written to ``meta.json``.

    Raises:
        FileExistsError: ``out_dir`` is non-empty and ``overwrite`` is false.
        ValueError: invalid arguments or fonts.
    """
    counts = {"train": num_train, "val": num_val, "test": num_test}
    for split, n in counts.items():
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"num_{split} must be a non-negative int, got {n!r}")
    if isinstance(tasks, str):
        tasks = [tasks]
    unknown = sorted(set(tasks) - set(KNOWN_TASKS))
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {KNOWN_TASKS}, got {list(tasks)}")
    task_list = tuple(t for t in KNOWN_TASKS if t in set(tasks))
    weights = None
    if task_weights is not None:
        bad = {
            t: w
            for t, w in task_weights.items()
            if t not in task_list or isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0
        }
        if bad:
            raise ValueError(f"task_weights must map tasks of {list(task_list)} to weights >= 0, got {bad}")
        weights = [float(task_weights.get(t, 0.0)) for t in task_list]
        if not math.isfinite(sum(weights)) or sum(weights) <= 0:
            raise ValueError(f"task_weights: the weights must have a finite positive sum, got {task_weights}")
    if task_max_side is not None:
        bad_sides = {
            t: v
            for t, v in task_max_side.items()
            if t not in task_list or isinstance(v, bool) or not isinstance(v, int) or v < min_side
        }
        if bad_sides:
            raise ValueError(
                f"task_max_side must map tasks of {list(task_list)} to ints >= min_side={min_side}, got {bad_sides}"
            )
    side_of = {t: (task_max_side or {}).get(t, max_side) for t in task_list}
    if not (32 <= min_side <= max_side):
        raise ValueError(f"need 32 <= min_side <= max_side, got min_side={min_side}, max_side={max_side}")
    for name, frac in (("text_only_fraction", text_only_fraction), ("multi_turn_fraction", multi_turn_fraction)):
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {frac}")
    too_small = [t for t in task_list if side_of[t] < TASK_MIN_SIDE[t]]
    if too_small:
        raise ValueError(
            f"max_side={[side_of[t] for t in too_small]} is too small for tasks {too_small} "
            f"(need {[TASK_MIN_SIDE[t] for t in too_small]})"
        )
    font_paths = resolve_fonts(fonts)

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty (pass overwrite=True to replace the dataset)")
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    seen: set[str] = set()
    split_meta: dict[str, Any] = {}
    for split in SPLITS:
        n = counts[split]
        img_dir = out / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        lines: list[str] = []
        written: set[str] = set()
        task_counts: Counter[str] = Counter()
        multi = 0
        for index, task in enumerate(_schedule(n, seed, split, task_list, text_only_fraction, weights)):
            for attempt in range(1000):
                record, img, key = _make_sample(
                    split,
                    index,
                    task,
                    seed,
                    attempt,
                    min_side=min_side,
                    max_side=side_of.get(task, max_side),
                    fonts=font_paths,
                    multi_turn_fraction=multi_turn_fraction,
                )
                if key not in seen:
                    break
            else:  # pragma: no cover - would need ~1000 consecutive collisions
                raise RuntimeError(f"cannot draw a unique sample for {split}[{index}] ({task})")
            seen.add(key)
            if img is not None:
                name = Path(record["image"]).name
                # One flush for all images (os.sync below) instead of two fsyncs per small file.
                atomic_write(img_dir / name, _png_bytes(img), sync=False)
                written.add(name)
            multi += len(record["conversations"]) > 2
            task_counts[task] += 1
            lines.append(json.dumps(record, ensure_ascii=False, sort_keys=False) + "\n")
        atomic_write(out / f"{split}.jsonl", "".join(lines).encode("utf-8"))
        if overwrite:
            for stale in sorted(img_dir.glob("*.png")):
                if stale.name not in written:
                    stale.unlink()
        split_meta[split] = {
            "num_samples": n,
            "num_images": len(written),
            "text_only": task_counts[TEXT_TASK],
            "multi_turn": multi,
            "tasks": {t: task_counts[t] for t in (*task_list, TEXT_TASK)},
        }
        logger.info("synthetic %s: %d samples (%d images) in %s", split, n, len(written), img_dir)

    meta: dict[str, Any] = {
        "generator": "viq.demo.synthetic",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "tasks": list(task_list),
        "text_task": TEXT_TASK,
        "fonts": [font_label(f) for f in font_paths],
        "splits": split_meta,
        "args": {
            "num_train": num_train,
            "num_val": num_val,
            "num_test": num_test,
            "seed": seed,
            "tasks": list(task_list),
            "min_side": min_side,
            "max_side": max_side,
            "fonts": None if fonts is None else [font_label(f) for f in font_paths],
            "text_only_fraction": text_only_fraction,
            "multi_turn_fraction": multi_turn_fraction,
        },
        # Rendering/noise/PNG bytes depend on these; recorded so differences can be explained.
        "environment": {
            "pillow": PIL.__version__,
            "freetype": features.version("freetype2"),
            "zlib": features.version("zlib"),
            "numpy": np.__version__,
        },
    }
    os.sync()  # every image and split file is on disk before meta.json says the set is complete
    if task_weights is not None:
        meta["args"]["task_weights"] = {t: float(task_weights.get(t, 0.0)) for t in task_list}
    if task_max_side is not None:
        meta["args"]["task_max_side"] = {t: side_of[t] for t in task_list if t in task_max_side}
    atomic_write(out / "meta.json", (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    logger.info("synthetic dataset written to %s in %.1f s", out, time.perf_counter() - t0)
    return meta


def load_split(out_dir: str | os.PathLike[str], split: str) -> list[dict[str, Any]]:
    """Records of ``out_dir/<split>.jsonl`` in file order (``image`` paths relative to ``out_dir``).

    Raises:
        FileNotFoundError: the split file does not exist.
    """
    path = Path(out_dir) / f"{split}.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
