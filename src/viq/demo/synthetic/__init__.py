"""Deterministic synthetic multimodal QA data (LLaVA format) for ViQ demos, CI and benchmarks.

The generator draws small images with PIL (no matplotlib: fast and bit-reproducible) and asks
questions whose answers depend on fine detail (small text, small shapes, exact bar values), so a
tokenizer that loses detail measurably hurts answer accuracy.

* :mod:`.draw`: fonts, colours, backgrounds, noise, shapes and their placement.
* :mod:`.tasks`: the task generators and their registry :data:`TASKS` (table of questions there);
  :mod:`.simple`: the easy :data:`SIMPLE_TASKS` (not in the default mix).
* :mod:`.writer`: :func:`generate` (output layout and determinism rules there) and :func:`load_split`.
* :mod:`.scoring`: :func:`score`, the answer match.

Usage::

    from viq.demo import synthetic
    meta = synthetic.generate("qa", num_train=2000)
    records = synthetic.load_split("qa", "train")
"""

from viq.demo.synthetic.draw import (
    CELL_NAMES,
    DEFAULT_FONTS,
    PALETTE,
    PIL_DEFAULT_FONT,
    SHAPES,
    resolve_fonts,
)
from viq.demo.synthetic.scoring import normalize_answer, score
from viq.demo.synthetic.simple import (
    DIGITS,
    EDGE_NAMES,
    SIMPLE_ANSWERS,
    SIMPLE_COLORS,
    SIMPLE_QUESTIONS,
    SIMPLE_TASKS,
)
from viq.demo.synthetic.tasks import (
    ALL_TASKS,
    KNOWN_TASKS,
    TASK_MIN_SIDE,
    TASKS,
    TEXT_TASK,
    cell_name,
)
from viq.demo.synthetic.writer import GENERATOR_VERSION, SPLITS, generate, load_split

__all__ = [
    "ALL_TASKS",
    "CELL_NAMES",
    "DEFAULT_FONTS",
    "DIGITS",
    "EDGE_NAMES",
    "GENERATOR_VERSION",
    "KNOWN_TASKS",
    "PALETTE",
    "PIL_DEFAULT_FONT",
    "SHAPES",
    "SIMPLE_ANSWERS",
    "SIMPLE_COLORS",
    "SIMPLE_QUESTIONS",
    "SIMPLE_TASKS",
    "SPLITS",
    "TASKS",
    "TASK_MIN_SIDE",
    "TEXT_TASK",
    "cell_name",
    "generate",
    "load_split",
    "normalize_answer",
    "resolve_fonts",
    "score",
]
