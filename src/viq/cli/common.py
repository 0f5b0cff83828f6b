"""What every ``viq`` command shares: exit codes and errors, logging to stderr, progress bars, argument
types, model options and model loading."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from viq._progress import progress_bar as _bar

log = logging.getLogger("viq.cli")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "sdpa", "sdpa-per-image", "flex", "flash")


class CLIError(Exception):
    """A problem that ends the command with a message (no traceback) and ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# ============================================================================================ logging


class _Formatter(logging.Formatter):
    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info and self.verbose:
            msg += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.ERROR:
            return f"viq: error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"viq: warning: {msg}"
        if record.levelno < logging.INFO:
            return f"viq: debug: [{record.name}] {msg}"
        return msg


class _StderrHandler(logging.Handler):
    """Writes to the *current* ``sys.stderr`` through ``tqdm.write``, so that log lines do not tear
    an active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


@contextlib.contextmanager
def stderr_logging(verbose: bool, quiet: bool) -> Iterator[None]:
    """Route the ``viq`` loggers to stderr for the duration of one :func:`main` call."""
    logger = logging.getLogger("viq")
    handler = _StderrHandler()
    handler.setFormatter(_Formatter(verbose))
    saved_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)


@dataclasses.dataclass
class FileRun:
    """Book-keeping of a command over many files (encode, decode, eval-recon): done, skipped, failed."""

    done: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def fail(self, source: Path | str, reason: str) -> None:
        log.error("%s: %s", source, reason)
        self.failures.append((str(source), reason))

    def finish(self, verb: str) -> int:
        log.info("%s %d, skipped %d (exist), failed %d", verb, self.done, self.skipped, len(self.failures))
        if self.failures:
            lines = "".join(f"\n  {src}: {reason}" for src, reason in self.failures)
            log.error("%d file(s) failed:%s", len(self.failures), lines)
            return EXIT_FAILED
        return EXIT_OK


def progress_bar(total: int, desc: str, quiet: bool):
    """The commands' bar over files: hidden with ``--quiet``, else shown only when stderr is a terminal."""
    return _bar(total, desc, unit="file", show=False if quiet else None, leave=False)


# ============================================================================================ arguments


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def int_list_arg(text: str, *, low: int, high: int, plural: str, example: str, each: str) -> tuple[int, ...]:
    """Comma-separated integers, each in ``[low, high]`` (the messages name ``plural``, ``example``
    and ``each``: e.g. "integers", "8,8,8,6,5", "FSQ level")."""
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {plural} such as {example}, got {text!r}") from None
    if not values or any(not low <= v <= high for v in values):
        raise argparse.ArgumentTypeError(f"every {each} must be in [{low}, {high}], got {text!r}")
    return values


def levels_arg(text: str) -> tuple[int, ...]:
    return int_list_arg(text, low=2, high=255, plural="integers", example="8,8,8,6,5", each="FSQ level")


def torch_dtype(name: str):
    from viq.model.weights import TORCH_DTYPES

    return TORCH_DTYPES[name]


def torch_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"invalid --device {name!r}: {e}") from None


def official_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if getattr(args, "num_heads", None) is not None:
        kwargs["num_heads"] = args.num_heads
    if getattr(args, "levels", None) is not None:
        kwargs["levels"] = args.levels
    return kwargs


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def add_model_options(p: argparse.ArgumentParser, *, attention: bool = True) -> None:
    """The ``model`` option group of commands that load a model (device, dtype, attention, official overrides)."""
    g = p.add_argument_group("model")
    g.add_argument("--device", default="auto", help="torch device: auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", choices=DTYPES, default="float32", help="weight / activation dtype (default: float32)")
    if attention:
        g.add_argument(
            "--attention", choices=ATTENTION_BACKENDS, default="auto", help="attention kernel (default: auto)"
        )
    g.add_argument(
        "--num-heads",
        type=positive_int,
        metavar="N",
        help="official directories with a non-official width only: attention heads of the trunk",
    )
    g.add_argument(
        "--levels",
        type=levels_arg,
        metavar="L,L,...",
        help="official directories only: FSQ levels, e.g. 8,8,8,6,5, when they cannot be detected",
    )


def add_preprocess_options(p: argparse.ArgumentParser) -> None:
    """The ``preprocessing`` option group, the same on every command that reads images."""
    g = p.add_argument_group("preprocessing (default: native resolution, area in [256, 1024*1024] pixels)")
    g.add_argument("--max-pixels", type=positive_int, metavar="N", help="downscale larger images to at most this area")
    g.add_argument("--min-pixels", type=positive_int, metavar="N", help="upscale smaller images to at least this area")
    g.add_argument("--multiple", choices=("pad", "resize"), help="pad (official) or resize sides to multiples of 16")
    g.add_argument("--resample", choices=("bicubic", "bilinear", "lanczos", "nearest"), help="resize filter")
    g.add_argument(
        "--square",
        type=positive_int,
        metavar="N",
        help="official demo mode: shorter side -> N, centre crop N x N (N even)",
    )


def preprocess_config(args: argparse.Namespace, patch_size: int):
    """The :class:`~viq.formats.image.PreprocessConfig` of :func:`add_preprocess_options`' flags (those
    not given keep the library defaults); invalid combinations are usage errors."""
    from viq.formats.image import PreprocessConfig

    names = ("min_pixels", "max_pixels", "multiple", "resample", "square")
    given = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    if "max_pixels" in given and "min_pixels" not in given:  # --max-pixels alone below the default floor
        given["min_pixels"] = min(given["max_pixels"], PreprocessConfig.min_pixels)
    try:
        return PreprocessConfig(patch_size=patch_size, **given)
    except (TypeError, ValueError) as e:
        raise CLIError(f"invalid preprocessing options: {e}") from None


# ============================================================================================ model


def load_model(args: argparse.Namespace, components: tuple[str, ...]):
    """``viq.load`` with the command's device/dtype/attention options; failures are usage errors."""
    import viq
    from viq.model.official import is_official_dir

    path = Path(args.model)
    official = official_kwargs(args)
    if official and path.exists() and not is_official_dir(path):
        raise CLIError(f"{path}: --num-heads/--levels only apply to official model directories")
    device = torch_device(args.device)
    log.debug("loading %s (components %s) on %s as %s", path, ", ".join(components), device, args.dtype)
    try:
        # the argument as typed: a local path, or a Hub id owner/name[@revision][/subfolder]
        model = viq.load(args.model, device=device, dtype=torch_dtype(args.dtype), components=components, **official)
    except Exception as e:  # missing files, bad weights, missing optional dependency, bad device, ...
        log.debug("model loading failed", exc_info=True)
        raise CLIError(f"cannot load model {path}: {reason(e, path)}") from None
    backend = getattr(args, "attention", "auto")
    if backend != "auto":
        from viq.model.attention import available_backends

        available = available_backends(device)
        if backend not in available:
            raise CLIError(
                f"attention backend {backend!r} is not available on {device} (available: {', '.join(available)})"
            )
        model.set_attention_backend(backend)
    return model


def reason(exc: BaseException, source: Path | str) -> str:
    """The message of ``exc`` without a leading ``"<source>: "`` (the caller prints the source)."""
    msg = str(exc) or type(exc).__name__
    if "pass num_heads=" in msg or "pass levels=" in msg:  # library advice, in command-line terms
        msg = msg.replace("pass num_heads=", "pass --num-heads N").replace("pass levels=", "pass --levels L1,L2,...")
    for prefix in (f"{source}: ", f"{os.fspath(source)}: "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


# ============================================================================================ inputs and outputs


def list_images(inputs: list[str], run) -> list[Path]:
    """Image files named directly, and every image file under named folders (recursive, sorted,
    hidden files and folders left out: the listing of image-folder training data); each file once."""
    from viq.data.folder import find_images

    seen: set[str] = set()
    files: list[Path] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = [Path(f) for f in find_images(str(path), "skip")]
            if not found:
                log.warning("%s: no image files found", path)
        elif path.is_file():
            found = [path]
        else:
            run.fail(path, "not a regular file or folder" if path.exists() else "no such file or folder")
            continue
        for f in found:
            key = os.path.realpath(f)
            if key not in seen:
                seen.add(key)
                files.append(f)
    return files


def write_output(path: Path, content, what: str) -> None:
    """Write ``content`` (bytes, or a callable writing a temporary path) to ``path`` atomically, creating
    its folder; failures are one CLIError naming the file and what it was."""
    from viq._io import atomic_write

    try:
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, content)
    except (OSError, ValueError) as e:
        raise CLIError(f"{path}: cannot write the {what}: {e}", EXIT_FAILED) from None


def open_store(path: str):
    """A code store opened for reading; a store that cannot be opened is a usage error naming the problem."""
    from viq.store.format import StoreError
    from viq.store.reader import CodeStore

    try:
        return CodeStore.open(path, "r")
    except StoreError as e:  # the message names the file and the problem
        raise CLIError(str(e)) from None
