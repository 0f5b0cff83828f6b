"""LLaVA records: the training data's file format, parsed and validated in one place.

File format (the official training format, see ``official-viq-training.md`` §9.1)
---------------------------------------------------------------------------------
``path`` is a ``.json`` file holding one list of records, or a ``.jsonl`` file with one record
per line (blank lines are ignored). A record::

    {"id": "optional, str or int",
     "image": <image spec>,                        # optional; absent/null/[] = text-only sample
     "conversations": [{"from": "human" | "gpt" | "system", "value": "<image>\\nWhat is this?"},
                       ...]}

or, instead of ``conversations``, the chat-API style ``"messages": [{"role": "user" |
"assistant" | "system", "content": str}, ...]``. Both role vocabularies are accepted in both
forms (``human``/``user`` -> ``user``, ``gpt``/``assistant`` -> ``assistant``).

An image spec is a path string, ``{"img_path": path, "resize": ...}`` (official), or a list of
those (mixed freely). Relative paths are resolved against ``image_root`` (default: the folder
of the data file); absolute paths are used as they are. The official packed form
(``{"patch": file, "start_num": ..., "size": ...}``) is not supported and is reported as invalid.

``"resize"`` (official semantics, :class:`OfficialResize`):

* ``"<base>x<p>"``: area-preserving toward ``base**2``, each side floored to a multiple of ``p``
  (small images are up-scaled too); ``p <= 0``: a square ``base x base`` resize.
* ``[a, b]``: exactly ``(max(a, 64), max(b, 64))`` as PIL ``(width, height)``.
* absent / ``null``: the dataset's :class:`~viq.formats.image.PreprocessConfig` (viq's native-resolution
  policy, :func:`viq.formats.image.preprocess`).

Official resizes resample with PIL bilinear (as the authors' code); the image is decoded with
:func:`viq.formats.image.load_image` (EXIF orientation applied, alpha over ``background``, bomb guard),
and normalised with :func:`viq.formats.image.to_pixels` to float32 ``(3, H, W)`` in [-1, 1].

Everything that can be checked without decoding an image is checked here: JSON syntax, record
shape, roles and their order, empty or non-string turns, image specs and resize specs, and that the
number of literal ``"<image>"`` placeholders equals the number of images. Errors are
:class:`DataError` with messages ``"<file>:<line> (id=<id>): <problem>"``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

from viq._untrusted import LIMITS, json_depth
from viq.formats.resize import OfficialResize, parse_resize
from viq.mllm.chat import IMAGE_TOKEN, LLAVA_ROLES

__all__ = ["DataError", "ImageRef", "Record", "parse_record", "read_json_records", "iter_jsonl", "iter_json_list"]


_JSON_WS = re.compile(r"[ \t\n\r]*")


class DataError(ValueError):
    """A data file, record or image of a dataset is invalid.

    Messages start with where the problem is: ``"<file>:<line> (id=<id>): <problem>"`` for
    records, ``"<file>: <problem>"`` for whole files or single image files.
    """


class _Invalid(Exception):
    """Internal: one record is invalid (the message is the problem, without location)."""


# Internal records are NamedTuples: one is built per record/image at load time, and a tuple is
# several times cheaper to construct than a (frozen) dataclass (matters for ~1M-record files).
class ImageRef(NamedTuple):
    path: str  # resolved against image_root
    resize: OfficialResize | None
    #: an image stored as bytes in a columnar file (viq.data.columnar.Cell); ``path`` is then its store id
    cell: Any = None


class Record(NamedTuple):
    id: str
    has_id: bool
    where: str
    messages: tuple[tuple[str, str], ...]  # (role, content), normalised roles
    images: tuple[ImageRef, ...]

    @property
    def label(self) -> str:
        """``"<file>:<line> (id=...)"`` for error messages."""
        return f"{self.where} (id={self.id})" if self.has_id else self.where


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _parse_image_entry(entry: Any, k: int, root: str) -> ImageRef:
    """One image spec -> ``ImageRef``; ``root`` ends with a separator (or is empty)."""
    where = f"image[{k}]"
    if isinstance(entry, str):
        path, resize = entry, None
    elif isinstance(entry, dict):
        if "img_path" not in entry:
            if "patch" in entry:
                raise _Invalid(f"{where}: packed image entries ({{'patch': ...}}) are not supported; use img_path")
            raise _Invalid(f"{where}: an image dict needs an 'img_path' key, got keys {sorted(entry)}")
        path = entry["img_path"]
        if not isinstance(path, str):
            raise _Invalid(f"{where}: img_path must be a string, got {_type_name(path)}")
        try:
            resize = parse_resize(entry.get("resize"))
        except ValueError as e:
            raise _Invalid(f"{where}: {e}") from None
    else:
        raise _Invalid(
            f"{where}: expected a path string or {{'img_path': ..., 'resize': ...}}, got {_type_name(entry)}"
        )
    if not path.strip():
        raise _Invalid(f"{where}: empty image path")
    # Same as os.path.join(root, path) (absolute paths kept as they are), without its overhead.
    cell = entry.get("cell") if isinstance(entry, dict) else None
    if cell is not None and type(cell).__name__ != "Cell":
        raise _Invalid(
            f"{where}: 'cell' is viq's own reference to image bytes in a columnar file, got {_type_name(cell)}"
        )
    return ImageRef(path if os.path.isabs(path) else root + path, resize, cell)


def _parse_images(spec: Any, root: str) -> tuple[ImageRef, ...]:
    if spec is None:
        return ()
    entries = spec if isinstance(spec, list) else [spec]
    return tuple(_parse_image_entry(e, k, root) for k, e in enumerate(entries))


def _parse_turns(record: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    has_conv, has_msgs = "conversations" in record, "messages" in record
    if has_conv and has_msgs:
        raise _Invalid("record has both 'conversations' and 'messages'; use one")
    if not has_conv and not has_msgs:
        raise _Invalid("record has no 'conversations' (or 'messages')")
    key, role_key, text_key = ("conversations", "from", "value") if has_conv else ("messages", "role", "content")
    turns = record[key]
    if not isinstance(turns, list):
        raise _Invalid(f"'{key}' must be a list of turns, got {_type_name(turns)}")
    if not turns:
        raise _Invalid(f"empty '{key}'")

    out: list[tuple[str, str]] = []
    for k, turn in enumerate(turns):
        where = f"{key}[{k}]"
        if not isinstance(turn, dict):
            raise _Invalid(
                f"{where}: a turn must be an object with '{role_key}' and '{text_key}', got {_type_name(turn)}"
            )
        if role_key not in turn or text_key not in turn:
            raise _Invalid(f"{where}: a turn needs '{role_key}' and '{text_key}', got keys {sorted(turn)}")
        raw_role, text = turn[role_key], turn[text_key]
        role = LLAVA_ROLES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise _Invalid(f"{where}: unknown role {raw_role!r} (expected one of {sorted(LLAVA_ROLES)})")
        if not isinstance(text, str):
            raise _Invalid(f"{where}: '{text_key}' must be a string, got {_type_name(text)}")
        if not text.strip():
            raise _Invalid(f"{where}: empty {role} turn")
        out.append((role, text))

    # Order: [system] user assistant (user assistant)* -- what chat templates and the official
    # round-wise label masking assume.
    start = 0
    if out[0][0] == "system":
        start = 1
    for k in range(start, len(out)):
        role = out[k][0]
        expected = "user" if (k - start) % 2 == 0 else "assistant"
        if role == "system":
            raise _Invalid(f"{key}[{k}]: a system turn is only allowed as the first turn")
        if role != expected:
            what = "the first non-system turn" if k == start else f"turns must alternate user/assistant; {key}[{k}]"
            raise _Invalid(f"{what} must be {expected}, got {role}")
    if len(out) == start:
        raise _Invalid(f"'{key}' has only a system turn")
    if out[-1][0] != "assistant":
        raise _Invalid(f"the last turn must be assistant (the supervised answer), got {out[-1][0]}")
    return tuple(out)


def parse_record(obj: Any, where: str, root: str) -> Record:
    """Validate one JSON value; raises :class:`DataError` (with location) if it is invalid."""
    name = os.path.basename(where)
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {_type_name(obj)}")
    raw_id = obj.get("id")
    has_id = raw_id is not None
    if has_id and (isinstance(raw_id, bool) or not isinstance(raw_id, (str, int))):
        raise DataError(f"{where}: 'id' must be a string or an int, got {_type_name(raw_id)}")
    sample_id = str(raw_id) if has_id else name
    label = f"{where} (id={sample_id})" if has_id else where
    try:
        messages = _parse_turns(obj)
        images = _parse_images(obj.get("image"), root)
        n_placeholders = sum(text.count(IMAGE_TOKEN) for _, text in messages)
        if n_placeholders != len(images):
            raise _Invalid(
                f"{n_placeholders} '{IMAGE_TOKEN}' placeholder(s) in the text but {len(images)} image(s); "
                "they must match (one placeholder where each image goes)"
            )
    except _Invalid as e:
        raise DataError(f"{label}: {e}") from None
    return Record(sample_id, has_id, where, messages, images)


def iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
    """``(line_number, value)`` per non-blank line; a bad line yields a :class:`DataError` value."""
    lineno = 0
    limit = LIMITS.max_json_line_bytes
    try:
        # utf-8-sig: tolerate a BOM written by some editors.
        with open(path, encoding="utf-8-sig") as f:
            while True:
                line = f.readline(limit + 1)  # bounded: a 1 GB line is never held whole
                if not line:
                    break
                lineno += 1
                if len(line) > limit and not line.endswith("\n"):
                    while line and not line.endswith("\n"):  # skip the rest of the line, in pieces
                        line = f.readline(1 << 20)
                    yield (
                        lineno,
                        DataError(
                            f"{path}:{lineno}: line longer than {limit} characters "
                            f"(VIQ_LIMITS=max_json_line_bytes=N raises the limit)"
                        ),
                    )
                    continue
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    # A broken line only spoils itself: hand it back as a (skippable) error.
                    yield lineno, DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})")
                    continue
                except RecursionError:
                    value = None  # nested past Python's recursion limit: refused below like any deep record
                    depth = LIMITS.max_json_depth + 1
                else:
                    depth = json_depth(value)
                if depth > LIMITS.max_json_depth:  # too deeply nested: also only this line
                    yield (
                        lineno,
                        DataError(f"{path}:{lineno}: record nested deeper than {LIMITS.max_json_depth} levels"),
                    )
                else:
                    yield lineno, value
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno + 1}: not valid UTF-8 text ({e.reason})") from None


def iter_json_list(path: str) -> Iterator[tuple[int, Any]]:
    """``(line_number, value)`` per element of the top-level list of a ``.json`` file.

    The list is decoded element by element with ``raw_decode`` so that every record knows the
    line it starts on (``json.load`` loses positions). A syntax error anywhere is raised: the
    rest of the list cannot be trusted.
    """
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 text ({e.reason} at byte {e.start})") from None
    decoder = json.JSONDecoder()
    n = len(text)
    counted_to, line = 0, 1

    def line_at(pos: int) -> int:
        # Positions only move forward: count newlines incrementally (O(file size) overall).
        nonlocal counted_to, line
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        return line

    def skip_ws(pos: int) -> int:
        return _JSON_WS.match(text, pos).end()  # type: ignore[union-attr]  # always matches

    i = skip_ws(0)
    if i >= n:
        raise DataError(f"{path}: empty file (expected a JSON list of records)")
    if text[i] != "[":
        hint = " (one object per line? name the file .jsonl)" if text[i] == "{" else ""
        raise DataError(f"{path}:{line_at(i)}: the top level of a .json file must be a list of records{hint}")
    i = skip_ws(i + 1)
    if i < n and text[i] == "]":
        i = skip_ws(i + 1)
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            except RecursionError:
                raise DataError(
                    f"{path}:{line_at(i)}: JSON nested too deeply to read (the rest of the list cannot be trusted)"
                ) from None
            if json_depth(value) > LIMITS.max_json_depth:
                yield (
                    line_at(i),
                    DataError(f"{path}:{line_at(i)}: record nested deeper than {LIMITS.max_json_depth} levels"),
                )
            else:
                yield line_at(i), value
            i = skip_ws(end)
            if i < n and text[i] == ",":
                i = skip_ws(i + 1)  # a trailing comma then fails in raw_decode ("Expecting value")
                continue
            if i < n and text[i] == "]":
                i = skip_ws(i + 1)
                break
            at = line_at(min(i, n))
            raise DataError(f"{path}:{at}: invalid JSON: expected ',' or ']' after a record")
    if i < n:
        raise DataError(f"{path}:{line_at(i)}: invalid JSON: extra data after the top-level list")


def read_json_records(path: str | os.PathLike[str]) -> list[Any]:
    """The JSON values of a ``.jsonl`` (one per line) or ``.json`` (one list) data file, unvalidated:
    the file reading of :class:`LlavaDataset`, for callers that need the raw records (``viq eval-qa``
    reads their ``task`` / ``question`` / ``answer`` fields). Raises :class:`DataError` naming the file
    (and line) for a missing file, another extension, or invalid JSON."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".json", ".jsonl"):
        raise DataError(f"{path}: expected a .jsonl or .json file of LLaVA records")
    if not os.path.isfile(path):
        raise DataError(f"{path}: data file not found" if not os.path.exists(path) else f"{path}: not a file")
    values = []
    for _, value in iter_jsonl(path) if ext == ".jsonl" else iter_json_list(path):
        if isinstance(value, DataError):
            raise value
        values.append(value)
    return values
