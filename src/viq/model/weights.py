"""Reading weight files tensor by tensor, so that loading costs about the loaded model's memory.

Loading a float32 release into bfloat16 the naive way holds three copies at the peak: the file's
pages, the float32 tensors and the bfloat16 model. Here every tensor is read, converted to the
target device and dtype, and its source dropped before the next one is read:

* official ``.pth`` files are memory-mapped (``torch.load(mmap=True)``). Pages of a file mapping
  that have been read count in the process's resident set (``RssFile``) for as long as the mapping
  lives, so after each tensor is copied its pages are handed back with ``madvise(MADV_DONTNEED)``
  (Linux; the mapping is private and never written, so the kernel can always read them again from
  the file). :class:`MappedFile` does that, and only inside the mapping of the file it was made for.
* ``.safetensors`` files are read with ``safe_open``, which maps the file too; it is reopened every
  ``chunk_bytes`` so at most one chunk of file pages is resident at a time.

The peak is then the model plus one tensor in its stored dtype plus one chunk of file pages
(measured by ``bench/load_memory.py``, figures in docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

__all__ = [
    "MappedFile",
    "check_state",
    "convert",
    "convert_state",
    "read_safetensors",
    "safetensors_index",
    "write_safetensors",
    "CHUNK_BYTES",
    "TORCH_DTYPES",
]

#: The dtypes weights are loaded in, by the name recipes and the command line give them.
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: File pages resident at once while reading a safetensors file (bytes).
CHUNK_BYTES = 64 << 20
_MADV_DONTNEED = 4  # <sys/mman.h> on Linux


def convert(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype, *, copy: bool = False) -> torch.Tensor:
    """``t`` on ``device``; floating tensors in ``dtype``, others keep theirs. ``copy`` forces fresh
    memory even when nothing changes (so that the result never aliases a file mapping)."""
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=copy)


def convert_state(
    state: dict[str, torch.Tensor],
    device: torch.device | str,
    dtype: torch.dtype,
    release: Callable[[torch.Tensor], None] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`convert` every tensor of ``state``, one at a time. With ``release`` (e.g.
    :meth:`MappedFile.release`) every tensor is copied, so the result never aliases the source, and
    ``release`` is called with each source tensor as soon as its copy exists."""
    out = {}
    for key, t in state.items():
        out[key] = convert(t, device, dtype, copy=release is not None)
        if release is not None:
            release(t)
    return out


class MappedFile:
    """The private read-only mapping that ``torch.load(path, mmap=True)`` made of ``path``.

    :meth:`release` gives the pages under a tensor back to the kernel. Tensors outside this mapping
    (for example made by the loader itself) are left alone, since ``MADV_DONTNEED`` on anonymous
    memory would zero it.
    """

    def __init__(self, path: Path, start: int, end: int) -> None:
        self.path, self.start, self.end = path, start, end

    @classmethod
    def find(cls, path: str | os.PathLike, tensors: Iterable[torch.Tensor]) -> MappedFile | None:
        """The mapping of ``path`` that holds ``tensors`` (None off Linux or if they are not mapped)."""
        if not sys.platform.startswith("linux"):
            return None
        ptr = next((t.data_ptr() for t in tensors if t.numel()), None)
        if ptr is None:
            return None
        real = os.path.realpath(path)
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    if len(fields) < 6 or fields[5].rstrip("\n") != real:
                        continue
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    if start <= ptr < end and fields[1].startswith("r") and fields[1][3] == "p":
                        return cls(Path(real), start, end)
        except OSError:
            return None
        return None

    def release(self, t: torch.Tensor) -> None:
        """Drop the resident pages under ``t`` (whole pages around it, clipped to the mapping: a
        neighbour sharing a page is simply read from the file again when it is used)."""
        if t.device.type != "cpu":
            return
        storage = t.untyped_storage()  # one record of the file: the tensor and any views of it
        begin = storage.data_ptr()
        if not self.start <= begin < self.end:
            return
        page = mmap.PAGESIZE
        lo = begin - begin % page
        hi = min(self.end, -(-(begin + storage.nbytes()) // page) * page)
        if hi > lo:
            _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _LIBC


def read_safetensors(
    path: str | os.PathLike,
    keys: Iterable[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    chunk_bytes: int = CHUNK_BYTES,
) -> dict[str, torch.Tensor]:
    """``keys`` of a safetensors file, each converted to ``device`` / ``dtype`` (floating tensors) as
    soon as it is read. The file is reopened every ``chunk_bytes`` read, which unmaps the pages read
    so far (``safe_open`` keeps the whole file mapped while it is open)."""
    from safetensors import safe_open

    pending = list(keys)[::-1]
    out: dict[str, torch.Tensor] = {}
    try:
        while pending:
            with safe_open(os.fspath(path), framework="pt") as f:
                read = 0
                while pending and read < chunk_bytes:
                    key = pending.pop()
                    t = f.get_tensor(key)  # a copy in process memory
                    read += t.numel() * t.element_size()
                    out[key] = convert(t, device, dtype)
                    del t
    except RuntimeError:  # from torch (device, out of memory): not the file's fault
        raise
    except Exception as e:  # SafetensorError for corrupt files, OSError, ...
        raise ValueError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") from None
    return out


def safetensors_index(path: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """(tensor names, metadata) of a safetensors file, read from its header only.

    Raises:
        ValueError: naming ``path``, when the file is not a readable safetensors file.
    """
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt headers
        raise ValueError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") from None


def write_safetensors(path: str | os.PathLike, state: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``state`` (any device) to ``path`` atomically (temporary name, then rename)."""
    from safetensors.torch import save_file

    from viq._io import atomic_write

    out, seen = {}, set()
    for key, t in state.items():
        t = t.detach().contiguous().cpu()
        # safetensors refuses tensors that share storage (e.g. an embedder built from the same weights
        # as the encoder's dequantize path): such duplicates are stored as copies.
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    atomic_write(Path(path), lambda p: save_file(out, str(p), metadata=metadata))


def check_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> None:
    """Raise ValueError naming ``source`` unless ``state`` has exactly the keys and shapes of ``expected``."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not match the config"
            + (f"; missing {len(missing)} keys: {_preview(missing)}" if missing else "")
            + (f"; unexpected {len(unexpected)} keys: {_preview(unexpected)}" if unexpected else "")
        )
    for k, v in expected.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise ValueError(f"{source}: {k} has shape {tuple(state[k].shape)}, the config needs {tuple(v.shape)}")


def _preview(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")
