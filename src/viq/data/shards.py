"""WebDataset tar shards, streamed: each shard is read once, front to back, and never listed.

A WebDataset is a set of ``.tar`` files ("shards"), each holding samples as consecutive members
that share a key: ``000123.jpg``, ``000123.json``, ``000123.txt`` make the sample ``000123`` with the
fields ``jpg``, ``json`` and ``txt`` (the key is the member path up to the first ``.`` of its file
name; the field is the rest, lower-cased). :func:`iter_samples` reads a shard in tarfile stream mode
(``r|*``: sequential, no seeks, gzip/bz2/xz compression detected), so a shard costs one pass
whatever its size, and works on pipes and network file systems alike.

Shards are named by files, folders (every ``*.tar`` below, sorted) or brace patterns
(``shards/{00000..09999}.tar``, ``{train,val}-{0..3}.tar``): :func:`list_shards` expands names only,
it opens nothing, so whole shards can be dealt out to ranks and DataLoader workers before anything
is read.

The store id of an image member is :func:`viq.store.ids.tar_member_id` (``<shard file name>/<member>``),
i.e. the sample key qualified by its shard, plus the image's extension.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from viq._untrusted import LIMITS, printable

__all__ = [
    "SHARD_SUFFIXES",
    "WdsSample",
    "expand_braces",
    "is_shard_source",
    "iter_samples",
    "list_shards",
    "split_member",
]

#: File names taken as tar shards in folders (stream mode detects the compression itself).
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces, left to right: ``{000..003}`` (zero padding kept, the width of the
    wider end), ``{a,b}``; nested in sequence (``{a,b}-{0..1}`` -> 4 names). No braces: ``[pattern]``.

    Raises:
        ValueError: an empty or descending-with-padding-mismatch range, or unbalanced braces.
    """
    m = _BRACE.search(pattern)
    if m is None:
        if "{" in pattern or "}" in pattern:
            raise ValueError(f"unbalanced braces in {pattern!r}")
        return [pattern]
    body = m.group(1)
    r = _RANGE.match(body)
    if r is not None:
        lo, hi = int(r.group(1)), int(r.group(2))
        width = max(len(r.group(1)), len(r.group(2))) if r.group(1).startswith("0") or r.group(2).startswith("0") else 0
        step = 1 if hi >= lo else -1
        choices = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise ValueError(f"cannot expand {{{body}}} in {pattern!r}: expected {{first..last}} or {{a,b,...}}")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [name for choice in choices for name in expand_braces(head + choice + tail)]


def _is_shard_name(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES) and not name.startswith(".")


def is_shard_source(source: str | os.PathLike) -> bool:
    """Whether ``source`` names tar shards: a brace pattern or file with a shard suffix, or a folder
    holding shard files directly."""
    text = os.fspath(source)
    if "{" in text:
        return True
    path = Path(text)
    if path.is_dir():
        return any(_is_shard_name(e.name) for e in os.scandir(path) if e.is_file())
    return _is_shard_name(path.name)


def list_shards(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The shard files named by ``source`` (a file, a folder, a brace pattern, or a list of those),
    in order, without opening any. Folders contribute their shard files (recursively, hidden names
    skipped) sorted by relative path; patterns keep their expansion order.

    Raises:
        FileNotFoundError: a named shard or folder does not exist (patterns: the first missing one).
        ValueError: a folder without shards, or a bad pattern.
    """
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    shards: list[Path] = []
    for src in sources:
        text = os.fspath(src)
        if "{" in text:
            names = [Path(n) for n in expand_braces(text)]
            missing = [n for n in names if not n.is_file()]
            if missing:
                raise FileNotFoundError(f"{text}: {len(missing)} of {len(names)} shards missing, e.g. {missing[0]}")
            shards.extend(names)
            continue
        path = Path(text)
        if path.is_dir():
            found: list[tuple[tuple[str, ...], Path]] = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                rel = Path(dirpath).relative_to(path).parts
                found.extend((rel + (f,), Path(dirpath, f)) for f in filenames if _is_shard_name(f))
            if not found:
                raise ValueError(f"{path}: no tar shards ({', '.join(SHARD_SUFFIXES)}) in this folder")
            shards.extend(p for _, p in sorted(found))
        elif path.is_file():
            shards.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such shard or folder")
    return shards


def split_member(name: str) -> tuple[str, str]:
    """WebDataset key and field of a member name: ``"a/b/0001.seg.png"`` -> ``("a/b/0001", "seg.png")``."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


@dataclass
class WdsSample:
    """One WebDataset sample: its ``key`` within ``shard`` and its fields (field -> member bytes);
    ``members`` maps each field to its full member name (the image's name is part of its store id)."""

    shard: Path
    key: str
    fields: dict[str, bytes] = field(default_factory=dict)
    members: dict[str, str] = field(default_factory=dict)


def iter_samples(shard: str | os.PathLike, wanted: set[str] | None = None) -> Iterator[WdsSample]:
    """The samples of one shard, in file order, reading it once sequentially (``tarfile`` ``r|*``).

    Consecutive members with the same key form a sample (WebDataset's rule; a key that reappears
    later starts a new sample). Directories, links, hidden files and members without a field are
    skipped. ``wanted``: the fields to read (others are skipped without being kept in memory);
    default all.

    Raises:
        tarfile.TarError, OSError: an unreadable or truncated shard (after the samples before it).
    """
    shard = Path(shard)
    current: WdsSample | None = None
    with tarfile.open(shard, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, fld = split_member(member.name)
            if not fld or member.name.rpartition("/")[2].startswith("."):
                continue
            if current is None or key != current.key:
                if current is not None and current.fields:
                    yield current
                current = WdsSample(shard, key)
            if wanted is not None and fld not in wanted:
                continue
            if member.size > LIMITS.max_member_bytes:  # declared in the header: refused before reading
                raise tarfile.TarError(
                    f"{shard}: member {printable(member.name)} declares {member.size} bytes, more than the "
                    f"{LIMITS.max_member_bytes} a sample field may have (VIQ_LIMITS=max_member_bytes=N raises it)"
                )
            handle = tar.extractfile(member)
            if handle is None:
                continue
            current.fields[fld] = handle.read(member.size)
            current.members[fld] = member.name
    if current is not None and current.fields:
        yield current
