"""Opening and looking up a code store of millions of images (issue 10 item 3, the compact index).

Builds a synthetic store through the public writer (``CodeStore.create`` + ``ShardWriter.add``): N ids
shaped like WebDataset members (``shard-00012.tar/000012345.jpg``), each with a content hash and a
2x2 code grid (one 16x16 patch, 4 codes: a few bytes a record, so 10 M images stay small on disk),
spread over ``--writers`` writers and shards of about ``--per-shard`` records. Then, each in a fresh
interpreter:

* ``first_open_s``: the first open, which builds the merged index from the shards' lookup files;
* ``open_s``: a later open (the index exists): ``CodeStore.open`` + ``len``;
* ``rss_bytes_per_id``: resident memory added by that open, per id (``psutil``, RSS after - before);
* ``lookups_per_s``: ``sample_id in store`` over random existing ids, wall time (``lookups_per_cpu_s``:
  per second of this process's CPU time, which a busy shared machine does not dilute; ``misses_per_s``:
  absent ids),
  ``entries_per_s``: ``store.entry(id)``, ``gets_per_s``: ``store[id]`` (index lookup + record read +
  decode into ``Codes``);
* ``rss_after_lookups_bytes_per_id``: resident memory after the lookups, per id (file-backed pages of
  the mapped index, shared by every process that maps it);
* ``legacy_open_s`` (``--legacy``): building the index of an old store without lookup files (from the
  JSON shard indexes), once.

Targets: open <= 2 s and <= 40 B of RSS per id at 10 M ids, >= 200 k lookups/s.

    python -m bench.store_scale --ids 1000000
    python -m bench.store_scale --ids 10000000 --workdir /data/tmp --keep
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ID_FORMAT = "shard-{:05d}.tar/{:09d}.jpg"
LEVELS = (8, 8, 4, 3, 3)  # 2304 codes, 12 bits: a 4-code record is 6 bytes


def sample_id(i: int) -> str:
    return ID_FORMAT.format(i // 10000, i)


def build(path: Path, n: int, writers: int, per_shard: int) -> float:
    import numpy as np

    from viq.formats.codes import Codes
    from viq.store import CodeStore

    rng = np.random.default_rng(0)
    pool = [Codes(rng.integers(0, 2304, (1, 1, 4)), LEVELS) for _ in range(256)]
    store = CodeStore.create(path, levels=LEVELS, model_fingerprint="bench-store-scale", shard_bytes=6 * per_shard)
    t0 = time.perf_counter()
    per_writer = -(-n // writers)
    for w in range(writers):
        with store.writer(name=f"rank{w}") as wr:
            for i in range(w * per_writer, min(n, (w + 1) * per_writer)):
                sid = sample_id(i)
                wr.add(sid, pool[i & 255], content_hash=hashlib.sha256(sid.encode()).hexdigest())
        print(
            f"  writer rank{w} done: {min(n, (w + 1) * per_writer)} ids, {time.perf_counter() - t0:.1f} s", flush=True
        )
    return time.perf_counter() - t0


PROBE = r"""
import json, random, sys, time, hashlib
import psutil
from bench.store_scale import sample_id
from viq.store import CodeStore
n, lookups, gets = {n}, {lookups}, {gets}
rnd = random.Random(1)
hits = [sample_id(rnd.randrange(n)) for _ in range(lookups)]
misses = [sample_id(n + rnd.randrange(n)) for _ in range(lookups)]
proc = psutil.Process()
rss0 = proc.memory_info().rss
t0 = time.perf_counter()
st = CodeStore.open({path!r})
count = len(st)
open_s = time.perf_counter() - t0
rss1 = proc.memory_info().rss
out = dict(count=count, open_s=open_s, rss_open=rss1 - rss0)
if {measure}:
    c0 = time.process_time(); t0 = time.perf_counter(); ok = sum(1 for s in hits if s in st)
    t = time.perf_counter() - t0; c = time.process_time() - c0
    assert ok == lookups, ok
    out["lookups_per_s"] = lookups / t
    out["lookups_per_cpu_s"] = lookups / c
    t0 = time.perf_counter(); bad = sum(1 for s in misses if s in st); t = time.perf_counter() - t0
    assert bad == 0, bad
    out["misses_per_s"] = lookups / t
    t0 = time.perf_counter()
    for s in hits[:gets]:
        e = st.entry(s)
    out["entries_per_s"] = gets / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for s in hits[:gets]:
        c = st[s]
    out["gets_per_s"] = gets / (time.perf_counter() - t0)
    assert st.has_hash(hashlib.sha256(hits[0].encode()).hexdigest()) == hits[0]
    assert st.entry(hits[0]).sample_id == hits[0] and c.grid == (1, 1)
    out["rss_after_lookups"] = proc.memory_info().rss - rss0
print("RESULT " + json.dumps(out))
"""


def probe(path: Path, n: int, lookups: int, gets: int, measure: bool) -> dict:
    code = PROBE.format(n=n, lookups=lookups, gets=gets, path=str(path), measure=measure)
    # run from the repository root: `python -c` puts the working directory first on the path (bench.*)
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    if res.returncode:
        raise RuntimeError(f"probe failed:\n{res.stdout}\n{res.stderr}")
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ids", type=int, required=True, help="number of images (ids) in the synthetic store")
    ap.add_argument("--out", default=None, help="JSON record path (default bench/results/store_scale-<N>.json)")
    ap.add_argument("--workdir", default=None, help="where to build the store (default: a temporary folder)")
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=100_000, help="records per shard (about)")
    ap.add_argument("--lookups", type=int, default=200_000)
    ap.add_argument("--gets", type=int, default=20_000)
    ap.add_argument(
        "--legacy",
        action="store_true",
        help="also time building the index of a store without lookup files (the format before the compact index)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the store")
    args = ap.parse_args(argv)

    import torch

    from bench.common import write_record

    n = args.ids
    tmp = Path(tempfile.mkdtemp(prefix="store_scale-", dir=args.workdir))
    path = tmp / "codes.store"
    try:
        print(f"building a store of {n} ids in {path} ...", flush=True)
        build_s = build(path, n, max(1, min(args.writers, n)), args.per_shard)
        shards = len(list((path / "shards").glob("*.idx.json")))
        disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        first = probe(path, n, args.lookups, args.gets, measure=False)
        warm = probe(path, n, args.lookups, args.gets, measure=True)
        assert first["count"] == warm["count"] == n, (first, warm)
        index_bytes = sum(f.stat().st_size for f in (path / "index").glob("*.viqx"))
        lookup_bytes = sum(f.stat().st_size for f in (path / "shards").glob("*.lookup"))
        record = {
            "ids": n,
            "shards": shards,
            "writers": args.writers,
            "build_s": round(build_s, 2),
            "first_open_s": round(first["open_s"], 3),
            "open_s": round(warm["open_s"], 4),
            "rss_bytes_per_id": round(warm["rss_open"] / n, 3),
            "lookups_per_s": round(warm["lookups_per_s"]),
            "lookups_per_cpu_s": round(warm["lookups_per_cpu_s"]),
            "misses_per_s": round(warm["misses_per_s"]),
            "entries_per_s": round(warm["entries_per_s"]),
            "gets_per_s": round(warm["gets_per_s"]),
            "rss_after_lookups_bytes_per_id": round(warm["rss_after_lookups"] / n, 3),
            "index_file_bytes_per_id": round(index_bytes / n, 1),
            "lookup_files_bytes_per_id": round(lookup_bytes / n, 1),
            "store_bytes": disk,
            "load_avg_1min": round(os.getloadavg()[0], 2),
            "cpus": os.cpu_count(),
            "targets": {"open_s": 2.0, "rss_bytes_per_id": 40, "lookups_per_s": 200_000},
        }
        if args.legacy:
            for f in (path / "shards").glob("*.lookup"):
                f.unlink()
            shutil.rmtree(path / "index")
            record["legacy_open_s"] = round(probe(path, n, args.lookups, args.gets, measure=False)["open_s"], 2)
        record["meets_targets"] = (
            record["open_s"] <= 2.0 and record["rss_bytes_per_id"] <= 40 and record["lookups_per_s"] >= 200_000
        )
        out = args.out or str(Path(__file__).resolve().parent / "results" / f"store_scale-{n}.json")
        written = write_record("store_scale", torch.device("cpu"), record, out)
        print(json.dumps(record, indent=2))
        print(f"wrote {written}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
