"""Whole-store scans: :func:`verify_shards` (integrity) and :func:`code_stats` (sizes and code usage).

Both read every record. They work on a loaded index (:class:`~viq.store.format.ShardIndex` list)
rather than on a ``CodeStore``, so that the reader can call them (``CodeStore.verify`` / ``.stats``)
while :mod:`viq.store.check`, which opens stores, sits above the reader.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import mmap
import os
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from viq._untrusted import LIMITS
from viq.formats.bits import usage_stats
from viq.formats.image import padded_grid
from viq.store.format import (
    FLAG_ENTROPY,
    FORMAT_VERSION,
    INDEX_FILE,
    LOOKUP_FILE,
    SHARD_DIR,
    SHARD_FILE,
    SHARD_HEADER,
    SHARD_HEADER_SIZE,
    SHARD_MAGIC,
    STORE_FILE,
    TMP_SUFFIX,
    WRITER_LOCK,
    ShardName,
    StoreConfig,
    StoreError,
)
from viq.store.shard import ShardIndex, decode_record

__all__ = ["VerifyReport", "code_stats", "verify_shards"]

log = logging.getLogger(__name__)

# Report at most this many per-record problems per shard (a corrupt shard could yield 10^4).
_MAX_PROBLEMS_PER_SHARD = 20
# Codes gathered before one np.bincount in code_stats(): amortises the K-bin allocation.
_HIST_BATCH = 1 << 22


@dataclasses.dataclass
class VerifyReport:
    """Result of :meth:`CodeStore.verify <viq.store.reader.CodeStore.verify>`.

    Attributes:
        path: the store directory.
        shards: number of shard indexes checked.
        records: number of records checked.
        problems: everything that is wrong (empty for a sound store).
        notes: harmless findings, e.g. temporary files of a killed writer awaiting clean-up.
        repaired: derived files (lookups, the merged index) that were damaged and have been rebuilt
            from the shard indexes; the store is sound again, but something damaged its files.
        duplicate_ids: sample id -> the shard files that claim it (only ids claimed twice+).
    """

    path: str
    shards: int = 0
    records: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    duplicate_ids: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    repaired: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found (notes do not count)."""
        return not self.problems

    def summary(self) -> str:
        """Multi-line human-readable summary."""
        head = f"{self.path}: {self.shards} shard(s), {self.records} record(s): "
        head += "OK" if self.ok else f"{len(self.problems)} problem(s)"
        lines = [head]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  repaired: {r}" for r in self.repaired]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def verify_shards(
    path: Path,
    config: StoreConfig,
    shards: Sequence[ShardIndex],
    index_problems: Sequence[str],
    progress: Callable[[int], object] | None = None,
) -> VerifyReport:
    """Check the store at ``path`` whose loaded index is ``shards``; never raises for store damage.

    Checks each shard's size, header and sha256; every record's bounds, contiguity, CRC-32 and
    decoding (length, padding bits, every code < K, image size vs grid); sample ids claimed more than
    once; and notes leftovers in ``shards/``. ``index_problems`` (index files that failed to load or
    whose shard is missing) are reported first. Reads every byte of the store. ``progress`` is called
    with the number of records of each shard once it is checked.
    """
    report = VerifyReport(path=str(path), shards=len(shards))
    report.problems.extend(index_problems)
    claims: dict[str, list[str]] = collections.defaultdict(list)
    shard_dir = path / SHARD_DIR
    for shard in shards:
        for sid in shard.ids:
            claims[sid].append(shard.name)
        report.records += len(shard)
        report.problems.extend(_verify_shard(shard_dir / shard.name, shard, config))
        if progress is not None:
            progress(len(shard))
    for sid, where in claims.items():
        if len(where) > 1:
            report.duplicate_ids[sid] = where
    if report.duplicate_ids:
        dup = sorted(report.duplicate_ids)
        shown = ", ".join(f"{s!r} in {', '.join(report.duplicate_ids[s])}" for s in dup[:5])
        more = f" and {len(dup) - 5} more" if len(dup) > 5 else ""
        report.problems.append(f"{len(dup)} sample id(s) stored more than once: {shown}{more}")

    # Leftovers of killed writers are expected and harmless: they are notes, not problems.
    names = sorted(e.name for e in os.scandir(shard_dir))
    for name in names:
        if name.endswith(TMP_SUFFIX):
            report.notes.append(
                f"{name}: temporary file of an unfinished shard (removed by the next writer with the same name)"
            )
        elif SHARD_FILE.fullmatch(name):
            if ShardName.parse(name).index not in names:
                report.notes.append(f"{name}: shard without index (writer killed while finalising; ignored)")
        elif not INDEX_FILE.fullmatch(name) and not LOOKUP_FILE.fullmatch(name) and not WRITER_LOCK.fullmatch(name):
            report.notes.append(f"{name}: unexpected file in {SHARD_DIR}/")
    level = logging.INFO if report.ok else logging.WARNING
    log.log(
        level,
        "verified %s: %d shards, %d records, %d problems",
        path,
        report.shards,
        report.records,
        len(report.problems),
    )
    return report


def _verify_shard(path: Path, shard: ShardIndex, config: StoreConfig) -> list[str]:
    """Problems of one shard file against its index (at most ``_MAX_PROBLEMS_PER_SHARD`` per-record ones)."""
    name = shard.name
    try:
        actual_size = path.stat().st_size
    except OSError as exc:
        return [f"{name}: cannot read: {exc}"]
    problems: list[str] = []
    if actual_size != shard.size:
        problems.append(f"{name}: file is {actual_size} bytes but its index records {shard.size}")
    if actual_size < SHARD_HEADER_SIZE:
        return problems + [f"{name}: too short for a shard header"]
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        digest = hashlib.sha256(m).hexdigest()
        if digest != shard.sha256:
            problems.append(
                f"{name}: sha256 checksum mismatch (file {digest[:16]}..., index "
                f"{shard.sha256[:16]}...): shard is corrupt"
            )
        magic, version, flags = SHARD_HEADER.unpack_from(m, 0)
        want_flags = FLAG_ENTROPY if config.entropy_coding else 0
        if magic != SHARD_MAGIC or version != FORMAT_VERSION or flags != want_flags:
            problems.append(
                f"{name}: bad shard header (magic {magic!r}, version {version}, flags {flags}; "
                f"expected {SHARD_MAGIC!r}, {FORMAT_VERSION}, {want_flags})"
            )
        record_problems: list[str] = []
        expected_offset = SHARD_HEADER_SIZE
        for row, sid in enumerate(shard.ids):
            off, length = int(shard.offsets[row]), int(shard.lengths[row])
            where = f"{name}: record {row} ({sid!r})"
            if off != expected_offset:
                record_problems.append(
                    f"{where}: starts at byte {off}, expected {expected_offset} (records must be contiguous)"
                )
            expected_offset = off + length
            if off < SHARD_HEADER_SIZE or off + length > actual_size:
                record_problems.append(
                    f"{where}: bytes [{off}, {off + length}) point past the end of the {actual_size}-byte shard"
                )
                continue
            data = m[off : off + length]
            if zlib.crc32(data) != int(shard.crcs[row]):
                record_problems.append(f"{where}: CRC-32 mismatch")
            h, w = (int(v) for v in shard.grids[row])
            ih, iw = (int(v) for v in shard.image_sizes[row])
            if ih and padded_grid(ih, iw, config.patch_size) != (h, w):
                record_problems.append(f"{where}: image size {(ih, iw)} does not fit grid {(h, w)}")
            try:
                decode_record(
                    data,
                    h * w * config.codes_per_patch,
                    config.bits_per_code,
                    config.codebook_size,
                    config.entropy_coding,
                )
            except ValueError as exc:
                record_problems.append(f"{where}: {exc}")
        if shard.ids and expected_offset != actual_size:
            record_problems.append(f"{name}: last record ends at byte {expected_offset}, file has {actual_size}")
    if len(record_problems) > _MAX_PROBLEMS_PER_SHARD:
        extra = len(record_problems) - _MAX_PROBLEMS_PER_SHARD
        record_problems = record_problems[:_MAX_PROBLEMS_PER_SHARD] + [f"{name}: ... and {extra} more problems"]
    return problems + record_problems


def code_stats(
    path: Path,
    config: StoreConfig,
    files: Sequence[tuple[str, str]],
    records: Iterable[tuple[str, str, tuple[int, int], tuple[int, int] | None, bytes]],
    progress: Callable[[int], object] | None = None,
    each: Callable[[np.ndarray], object] | None = None,
) -> dict[str, Any]:
    """Size and code-usage statistics of the store at ``path``: ``files`` are the ``(shard, index)``
    file names of its loaded shards and ``records`` yields ``(sample id, shard, grid, image size or
    None, record bytes)`` of every distinct sample id. The fields are listed in
    :meth:`CodeStore.stats <viq.store.reader.CodeStore.stats>`; ratios are None for an empty store.
    Derived index files (``*.lookup``, ``index/``) are caches and not counted in ``store_bytes``.
    ``progress`` is called with the number of records read since its last call (every 4096); ``each``,
    if given, with every record's decoded codes ((h*w*codes_per_patch,) int array, official order), so a
    caller can count more in the same pass.

    Raises:
        StoreError: a record that does not decode.
    """
    k = config.codebook_size
    if k > LIMITS.max_histogram_codes:  # checked before a K-entry histogram is allocated
        raise StoreError(
            path / STORE_FILE,
            f"levels {list(config.levels)} make a codebook of {k} codes; counting their "
            f"use needs a histogram larger than {LIMITS.max_histogram_codes} entries "
            f"(VIQ_LIMITS=max_histogram_codes=N raises the limit)",
        )
    hist = np.zeros(k, dtype=np.int64)
    pending: list[np.ndarray] = []
    pending_n = 0
    images = codes_total = pixels = padded = payload = 0
    for count, (sid, shard, (h, w), size, data) in enumerate(records, 1):
        if progress is not None and count % 4096 == 0:
            progress(4096)
        n = h * w * config.codes_per_patch
        try:
            values = decode_record(data, n, config.bits_per_code, k, config.entropy_coding)
        except ValueError as exc:
            raise StoreError(path / SHARD_DIR / shard, f"record {sid!r}: {exc}") from None
        if each is not None:
            each(values)
        pending.append(values)
        pending_n += n
        if pending_n >= _HIST_BATCH:
            hist += np.bincount(np.concatenate(pending), minlength=k)
            pending, pending_n = [], 0
        pad = h * w * config.patch_size * config.patch_size
        images += 1
        codes_total += n
        padded += pad
        pixels += size[0] * size[1] if size else pad
        payload += len(data)
    if pending:
        hist += np.bincount(np.concatenate(pending), minlength=k)
    if progress is not None and images % 4096:
        progress(images % 4096)

    store_bytes = (path / STORE_FILE).stat().st_size
    for pair in files:
        for name in pair:
            try:
                store_bytes += (path / SHARD_DIR / name).stat().st_size
            except OSError:
                pass
    used = int(np.count_nonzero(hist))
    entropy = usage_stats(hist)["entropy_bits"] if codes_total else None

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    return {
        "images": images,
        "shards": len(files),
        "total_codes": codes_total,
        "pixels": pixels,
        "padded_pixels": padded,
        "payload_bytes": payload,
        "store_bytes": store_bytes,
        "bpp": ratio(store_bytes * 8, pixels),
        "bpp_payload": ratio(payload * 8, pixels),
        "bpp_payload_padded": ratio(payload * 8, padded),
        "bits_per_code": config.bits_per_code,
        "payload_bits_per_code": ratio(payload * 8, codes_total),
        "entropy_coding": config.entropy_coding,
        "levels": list(config.levels),
        "codebook_size": k,
        "histogram": hist,
        "entropy_bits": entropy,
        "perplexity": None if entropy is None else float(2.0**entropy),
        "codebook_used": used,
        "codebook_used_fraction": used / k,
    }
