"""Offline code extraction: images -> a :class:`viq.store.reader.CodeStore`, on one or many devices, resumable.

::

    viq extract M photos/ -o codes.store
    torchrun --nproc_per_node 8 -m viq extract M 'shards/{00000..09999}.tar' -o codes.store
    viq extract M data.parquet -o codes.store --image-column jpg --id-column key

* **Inputs**: a folder (recursive; id = path relative to the folder), a LLaVA JSON/JSONL file (every
  distinct image path of its records, read through the training data reader :mod:`viq.data.llava` and
  sized as training sizes it, the record's ``"resize"`` included; id = the path as written, so training
  finds its codes; one path under two different resizes is an error naming both records),
  WebDataset tar shards as files, folders or brace patterns (:mod:`viq.data.shards`; id =
  ``<shard name>/<member name>``), or Parquet / Arrow / ``datasets.save_to_disk`` data
  (:mod:`viq.data.columnar`; id = the id column, else the image path, else ``<file>/<row>``).
* **Sharding** (rank and world size from flags or the launcher, :mod:`viq.launch`): shards and
  row groups / record batches are *units of work*, dealt out whole: rank r of W takes units r, r+W, ...
  of the ordered unit list, and DataLoader worker k of K of those takes every K-th; each tar is read
  once, sequentially, and nothing is listed up front. Folders and LLaVA files are dealt out image by
  image (r, r+W, ...). Each rank writes its own store shards (writer ``rank<r>``): no locks, no shared files.
* **Pipeline**: DataLoader workers read, hash (sha256 of the image bytes) and preprocess images in
  parallel; the main process drops duplicates and hands the rest to :meth:`ViQModel.encode_stream`,
  which packs them up to ``batch_tokens`` patch tokens per forward pass.
* **Resumable**: shards are finalised atomically every ``flush_every`` images; a re-run skips every id
  already in the store, so a run killed at any moment (even mid-shard) finishes with each image stored
  exactly once and nothing corrupt. A unit of work whose images are all durably stored is recorded in
  ``done-units-rank<r>.jsonl`` (rewritten atomically after the store flush that made it durable); a
  re-run skips recorded units without opening them, whichever rank recorded them.
* **Deduplication**: an image whose bytes were already stored (same sha256, and same per-record resize:
  :func:`viq.store.ids.content_hash`) is not encoded again; its codes are copied under the new id.
* **One image per id**: an id met again in a run with other bytes (or another resize) -- a repeated id
  column value, the same tar member name -- is recorded as an error naming both sources, never given
  the first one's codes. (A re-run does not re-read images already stored under their id.)
* **Errors**: unreadable images (and images whose forward pass fails) are recorded in
  ``errors-rank<r>.jsonl`` beside the shards and skipped; the summary counts them. A shard or file
  that cannot be read to its end is recorded there too (id = the unit) and is not marked done, so a
  re-run retries it (its images already stored are skipped).

The pieces: :mod:`.inputs` (what the images are: units, items, reading and preparing them in the
DataLoader's workers) and :mod:`.run` (:class:`Extraction`: the steps of one rank's run, and
:func:`extract`, its one-call form).
"""

from viq.extract.inputs import DONE_FILE, Item, Unit, list_items, list_units
from viq.extract.run import Extraction, ExtractResult, extract

__all__ = ["extract", "Extraction", "ExtractResult", "list_items", "list_units", "Item", "Unit", "DONE_FILE"]
