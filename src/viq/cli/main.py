"""The ``viq`` command line: encode images to ``.viq`` codes, decode codes to PNG, inspect, convert.

::

    viq encode MODEL INPUT... -o OUTDIR      images / folders -> one <stem>.viq per image
    viq decode MODEL INPUT... -o OUTDIR      .viq files / folders -> one <stem>.png per file
    viq info PATH [--json]                   describe a .viq file or a model directory
    viq convert OFFICIAL_DIR OUT_DIR         official release -> viq format (config.json + safetensors)

Exit codes: 0 success; 1 some inputs failed (the others were still processed) or the command could
not complete; 2 usage error, including a model directory that cannot be loaded.

Diagnostics go through :mod:`logging` (logger ``viq``) to stderr; the output of a command proper
(``info``, ``convert``) goes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from viq.formats.image import IMAGE_EXTENSIONS

log = logging.getLogger("viq.cli")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

#: File extensions (lower case) that ``viq encode`` picks up inside folders.
CODES_EXTENSION = ".viq"
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "flash")


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
def _logging(verbose: bool, quiet: bool) -> Iterator[None]:
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


def _progress(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    # disable=None: tqdm shows the bar only when stderr is a terminal.
    return tqdm(total=total, desc=desc, unit="file", file=sys.stderr, disable=True if quiet else None,
                dynamic_ncols=True, leave=False)


# ============================================================================================ helpers


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _levels_arg(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 8,8,8,6,5, got {text!r}") from None
    if not levels or any(not 2 <= v <= 255 for v in levels):
        raise argparse.ArgumentTypeError(f"every FSQ level must be in [2, 255], got {text!r}")
    return levels


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"invalid --device {name!r}: {e}") from None


def _official_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if getattr(args, "num_heads", None) is not None:
        kwargs["num_heads"] = args.num_heads
    if getattr(args, "levels", None) is not None:
        kwargs["levels"] = args.levels
    return kwargs


def _load_model(args: argparse.Namespace, components: tuple[str, ...]):
    """``viq.load`` with the command's device/dtype/attention options; failures are usage errors."""
    import viq
    from viq.model.official import is_official_dir

    path = Path(args.model)
    official = _official_kwargs(args)
    if official and path.exists() and not is_official_dir(path):
        raise CLIError(f"{path}: --num-heads/--levels only apply to official model directories")
    device = _device(args.device)
    log.debug("loading %s (components %s) on %s as %s", path, ", ".join(components), device, args.dtype)
    try:
        model = viq.load(path, device=device, dtype=_dtype(args.dtype), components=components, **official)
    except Exception as e:  # missing files, bad weights, missing optional dependency, bad device, ...
        log.debug("model loading failed", exc_info=True)
        raise CLIError(f"cannot load model {path}: {_reason(e, path)}") from None
    backend = getattr(args, "attention", "auto")
    if backend != "auto":
        from viq.model.attention import available_backends

        available = available_backends(device)
        if backend not in available:
            raise CLIError(f"attention backend {backend!r} is not available on {device} (available: {', '.join(available)})")
        model.set_attention_backend(backend)
    return model


def _reason(exc: BaseException, source: Path | str) -> str:
    """The message of ``exc`` without a leading ``"<source>: "`` (the caller prints the source)."""
    msg = str(exc) or type(exc).__name__
    if "pass num_heads=" in msg or "pass levels=" in msg:  # library advice, in command-line terms
        msg = msg.replace("pass num_heads=", "pass --num-heads N").replace("pass levels=", "pass --levels L1,L2,...")
    for prefix in (f"{source}: ", f"{os.fspath(source)}: "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


@dataclasses.dataclass
class _Job:
    source: Path
    output: Path


@dataclasses.dataclass
class _Run:
    """Book-keeping of one encode/decode run."""

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


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _plan(
    inputs: Sequence[str],
    outdir: Path,
    extensions: Iterable[str],
    out_suffix: str,
    recursive: bool,
    what: str,
    run: _Run,
) -> list[_Job]:
    """Expand files and folders into (source, output) jobs.

    A folder contributes its files with a matching extension (sorted; sub-folders with
    ``recursive``; hidden files and folders are ignored), each written to ``outdir`` under its path
    relative to that folder. A file named directly is written to ``outdir/<stem><out_suffix>``
    whatever its extension. Two different sources that would write the same output are an error
    for the second one; the same source named twice is encoded once.
    """
    exts = {e.lower() for e in extensions}
    jobs: list[_Job] = []
    claimed: dict[str, Path] = {}

    def add(source: Path, output: Path) -> None:
        key = os.path.abspath(output)
        first = claimed.get(key)
        if first is not None:
            if os.path.realpath(first) == os.path.realpath(source):
                log.debug("%s: named more than once, processed once", source)
            else:
                run.fail(source, f"output {output} would also be written for {first}; not overwriting it "
                                 f"(rename one of the inputs or process them separately)")
            return
        claimed[key] = source
        jobs.append(_Job(source, output))

    for text in inputs:
        path = Path(text)
        if path.is_dir():
            pattern = path.rglob("*") if recursive else path.iterdir()
            found = sorted(
                (f for f in pattern
                 if f.suffix.lower() in exts and not _is_hidden(f.relative_to(path)) and f.is_file()),
                key=lambda f: f.relative_to(path).parts,
            )
            if not found:
                hint = "" if recursive else " (use -r to search sub-folders)"
                log.warning("%s: no %s files found%s", path, what, hint)
            for f in found:
                add(f, outdir / f.relative_to(path).with_suffix(out_suffix))
        elif path.is_file():
            add(path, outdir / (path.stem + out_suffix))
        elif path.exists():
            run.fail(path, "not a regular file or folder")
        else:
            run.fail(path, "no such file or folder")
    return jobs


def _check_outdir(outdir: Path) -> None:
    if outdir.exists() and not outdir.is_dir():
        raise CLIError(f"{outdir}: output path exists and is not a folder")


def _skip_existing(jobs: list[_Job], overwrite: bool, run: _Run) -> list[_Job]:
    if overwrite:
        return jobs
    todo = []
    for job in jobs:
        if job.output.exists():
            log.debug("%s: exists, skipped", job.output)
            run.skipped += 1
        else:
            todo.append(job)
    return todo


def _atomic_save_image(image: Any, path: Path) -> None:
    """Save a PIL image as PNG to ``path`` via a temporary file + rename (never a half-written file)."""
    from viq._io import atomic_write

    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


# ============================================================================================ fingerprints


def _model_fingerprint(model: Any) -> str | None:
    """The code-space id of the loaded model (what ``viq encode`` writes), or None if unknown."""
    try:
        return model.fingerprint()
    except RuntimeError:
        return None


# ============================================================================================ encode


def cmd_encode(args: argparse.Namespace) -> int:
    import torch

    from viq.formats.image import PreprocessConfig, preprocess
    from viq.model.viq import DEFAULT_BATCH_TOKENS

    outdir = Path(args.output)
    _check_outdir(outdir)
    batch_tokens = args.batch_tokens or DEFAULT_BATCH_TOKENS
    run = _Run()
    jobs = _plan(args.inputs, outdir, IMAGE_EXTENSIONS, CODES_EXTENSION, args.recursive, "image", run)
    todo = _skip_existing(jobs, args.overwrite, run)

    model = _load_model(args, ("encoder",))
    try:
        cfg = PreprocessConfig(
            patch_size=model.patch_size,
            **{k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels),
                                 ("multiple", args.multiple), ("resample", args.resample),
                                 ("square", args.square)) if v is not None},
        )
    except (TypeError, ValueError) as e:
        raise CLIError(f"invalid preprocessing options: {e}") from None
    fingerprint = model.fingerprint()
    log.debug("model %s (fingerprint %s), %d to encode, batch budget %d tokens", args.model, fingerprint, len(todo),
              batch_tokens)

    bar = _progress(len(todo), "encode", args.quiet)
    pending: list[tuple[_Job, Any]] = []

    def write(job: _Job, prepared: Any, codes: Any) -> None:
        meta = {"model": fingerprint, "source": str(job.source), "source_size": list(prepared.source_size)}
        try:
            job.output.parent.mkdir(parents=True, exist_ok=True)
            dataclasses.replace(codes, metadata=meta).save(job.output)
        except (OSError, ValueError) as e:
            run.fail(job.source, f"cannot write {job.output}: {_reason(e, job.output)}")
            return
        log.debug("%s -> %s (grid %dx%d)", job.source, job.output, *codes.grid)
        run.done += 1

    def flush() -> None:
        if not pending:
            return
        batch = list(pending)
        pending.clear()
        try:
            codes = model.encode_pixels([p.pixels for _, p in batch], batch_tokens=batch_tokens)
        except (RuntimeError, ValueError, torch.cuda.OutOfMemoryError) as e:
            if len(batch) > 1:  # retry one by one so that one bad image does not fail its pack
                log.debug("pack of %d failed (%s); retrying one by one", len(batch), e)
                for item in batch:
                    pending.append(item)
                    flush()
                return
            run.fail(batch[0][0].source, f"encoding failed: {e}")
            bar.update(1)
            return
        for (job, prepared), c in zip(batch, codes):
            write(job, prepared, c)
        bar.update(len(batch))

    tokens = 0
    try:
        for job in todo:
            try:
                prepared = preprocess(job.source, cfg)
            except Exception as e:  # ImageError for anything unreadable; be robust to the rest too
                run.fail(job.source, _reason(e, job.source))
                bar.update(1)
                continue
            pending.append((job, prepared))
            tokens += prepared.num_tokens
            if tokens >= batch_tokens:
                flush()
                tokens = 0
        flush()
    finally:
        bar.close()
    return run.finish("encoded")


# ============================================================================================ decode


def cmd_decode(args: argparse.Namespace) -> int:
    from viq.formats.codes import Codes, CodesFormatError

    outdir = Path(args.output)
    _check_outdir(outdir)
    run = _Run()
    jobs = _plan(args.inputs, outdir, (CODES_EXTENSION,), ".png", args.recursive, ".viq", run)
    todo = _skip_existing(jobs, args.overwrite, run)

    model = _load_model(args, ("drawer", "vae"))
    fingerprint = _model_fingerprint(model)
    if fingerprint is None:
        log.debug("%s: no encoder fingerprint available; not checking where the codes come from", args.model)
    foreign: list[str] = []

    bar = _progress(len(todo), "decode", args.quiet)
    try:
        for job in todo:
            try:
                codes = Codes.load(job.source)
            except (CodesFormatError, OSError) as e:
                run.fail(job.source, _reason(e, job.source))
                bar.update(1)
                continue
            source_model = codes.metadata.get("model")
            if fingerprint is not None and isinstance(source_model, str) and source_model != fingerprint:
                if not foreign:
                    log.warning("%s: codes come from a different model (fingerprint %s, %s has %s); decoding anyway",
                                job.source, source_model, args.model, fingerprint)
                else:
                    log.debug("%s: codes from a different model (%s)", job.source, source_model)
                foreign.append(str(job.source))
            try:
                image = model.reconstruct([codes], crop=not args.no_crop)[0]
            except (RuntimeError, ValueError) as e:
                run.fail(job.source, f"decoding failed: {_reason(e, job.source)}")
                bar.update(1)
                continue
            try:
                job.output.parent.mkdir(parents=True, exist_ok=True)
                _atomic_save_image(image, job.output)
            except OSError as e:
                run.fail(job.source, f"cannot write {job.output}: {_reason(e, job.output)}")
            else:
                log.debug("%s -> %s (%dx%d)", job.source, job.output, *image.size)
                run.done += 1
            bar.update(1)
    finally:
        bar.close()
    if len(foreign) > 1:
        log.warning("%d files come from a different model than %s", len(foreign), args.model)
    return run.finish("decoded")


# ============================================================================================ info


def _codes_info(path: Path) -> dict[str, Any]:
    from viq.formats.codes import Codes, CodesFormatError

    try:
        codes = Codes.load(path)
    except CodesFormatError as e:
        raise CLIError(str(e), EXIT_FAILED) from None
    except OSError as e:
        raise CLIError(f"{path}: cannot read: {e.strerror or e}", EXIT_FAILED) from None
    size = path.stat().st_size
    h, w = codes.grid
    payload_bits = codes.num_codes * codes.bits_per_code
    if codes.image_size is not None:
        pixels, basis = codes.image_size[0] * codes.image_size[1], "image"
    else:
        pixels, basis = h * w * codes.patch_size**2, "padded"
    return {
        "type": "codes",
        "path": str(path),
        "file_size": size,
        "levels": list(codes.levels),
        "codebook_size": codes.codebook_size,
        "bits_per_code": codes.bits_per_code,
        "codes_per_patch": codes.codes_per_patch,
        "patch_size": codes.patch_size,
        "grid": [h, w],
        "num_codes": codes.num_codes,
        "image_size": None if codes.image_size is None else list(codes.image_size),
        "padded_size": [h * codes.patch_size, w * codes.patch_size],
        "payload_bytes": (payload_bits + 7) // 8,
        "bpp_basis": basis,
        "bpp_file": size * 8 / pixels,
        "bpp_payload": payload_bits / pixels,
        "metadata": codes.metadata,
    }


def _component_of(key: str) -> str:
    prefix = key.split(".", 1)[0]
    return "encoder" if prefix == "head" else prefix


def _model_info(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Describe a model directory from its config and tensor shapes, without building the model."""
    from viq.model.config import ViQConfig
    from viq.model.viq import COMPONENTS, code_fingerprint
    from viq.model.official import (
        detect_config,
        find_official_files,
        is_official_dir,
        load_official_state_dicts,
        map_official_state_dicts,
    )

    official = _official_kwargs(args)
    config_path, weights_path = path / "config.json", path / "model.safetensors"
    try:
        if weights_path.is_file():
            if official:
                raise CLIError(f"{path}: --num-heads/--levels only apply to official model directories")
            from safetensors import safe_open

            fmt = "viq"
            config = ViQConfig.load(config_path)
            with safe_open(str(weights_path), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                fingerprint = (f.metadata() or {}).get("fingerprint")
                if "head.project_in.weight" in shapes:
                    fingerprint = code_fingerprint(
                        config, f.get_tensor("head.project_in.weight"), f.get_tensor("head.project_in.bias"))
        elif is_official_dir(path):
            fmt = "official"
            files = find_official_files(path)
            states = load_official_state_dicts(path)  # memory-mapped: cheap even for the giant models
            tag = files["encoder"].name[len("model_viq_fsq_"):-len(".pth")]
            config = detect_config(states, size_tag=tag, source=str(path), **official)
            state, _ = map_official_state_dicts(states, config, source=str(path))
            shapes = {k: tuple(v.shape) for k, v in state.items()}
            fingerprint = code_fingerprint(config, state["head.project_in.weight"], state["head.project_in.bias"])
        elif not path.exists():
            raise CLIError(f"{path}: no such file or folder")
        else:
            raise CLIError(f"{path}: neither a .viq file, a viq model directory (config.json + model.safetensors) "
                           f"nor an official ViQ directory (model_viq_fsq_<size>.pth)")
    except CLIError:
        raise
    except Exception as e:
        log.debug("reading %s failed", path, exc_info=True)
        raise CLIError(f"cannot read model {path}: {_reason(e, path)}") from None

    params: dict[str, int] = {}
    for key, shape in shapes.items():
        component = _component_of(key)
        params[component] = params.get(component, 0) + math.prod(shape)
    components = [c for c in COMPONENTS if c in params]

    enc, head = config.encoder, config.head
    return {
        "type": "model",
        "path": str(path),
        "format": fmt,
        "name": config.name,
        "width": enc.width,
        "depth": enc.depth,
        "num_heads": enc.num_heads,
        "patch_size": enc.patch_size,
        "levels": list(head.levels),
        "codebook_size": head.codebook_size,
        "bits_per_code": max(1, (head.codebook_size - 1).bit_length()),
        "codes_per_patch": head.codes_per_patch,
        "components": components,
        "parameters": {c: params[c] for c in components},
        "total_parameters": sum(params[c] for c in components),
        "fingerprint": fingerprint,
        "config": config.to_dict(),
    }


def _human(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _print_table(rows: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows) + 1
    for key, value in rows:
        print(f"{key + ':':<{width}} {value}")


def cmd_info(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.is_file():
        info = _codes_info(path)
    else:
        info = _model_info(path, args)
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    if info["type"] == "codes":
        h, w = info["grid"]
        image = "unknown" if info["image_size"] is None else "{} x {}".format(*info["image_size"])
        meta = json.dumps(info["metadata"], ensure_ascii=False) if info["metadata"] else "{}"
        _print_table([
            ("file", f"{info['path']} ({info['file_size']} bytes)"),
            ("levels", ",".join(map(str, info["levels"]))),
            ("codebook size", info["codebook_size"]),
            ("bits per code", info["bits_per_code"]),
            ("grid", f"{h} x {w} patches of {info['patch_size']} px"),
            ("codes", f"{info['num_codes']} ({info['codes_per_patch']} per patch)"),
            ("image size", f"{image} (h x w; padded {info['padded_size'][0]} x {info['padded_size'][1]})"),
            ("bits per pixel", f"{info['bpp_file']:.4f} (file), {info['bpp_payload']:.4f} (payload)"
                               + ("" if info["bpp_basis"] == "image" else " over the padded canvas")),
            ("metadata", meta),
        ])
    else:
        params = ", ".join(f"{c} {_human(n)}" for c, n in info["parameters"].items())
        _print_table([
            ("model", f"{info['path']} ({info['format']} format)"),
            ("name", info["name"]),
            ("width", info["width"]),
            ("depth", info["depth"]),
            ("heads", info["num_heads"]),
            ("patch size", info["patch_size"]),
            ("levels", ",".join(map(str, info["levels"]))),
            ("codebook size", f"{info['codebook_size']} ({info['bits_per_code']} bits/code, "
                              f"{info['codes_per_patch']} codes/patch)"),
            ("components", ", ".join(info["components"])),
            ("parameters", f"{_human(info['total_parameters'])} ({params})"),
            ("fingerprint", info["fingerprint"] or "unknown"),
        ])
    return EXIT_OK


# ============================================================================================ convert


def cmd_convert(args: argparse.Namespace) -> int:
    from viq.model.official import is_official_dir, load_official

    src, out = Path(args.official_dir), Path(args.out_dir)
    if not is_official_dir(src):
        raise CLIError(f"{src}: not an official ViQ directory (expected one model_viq_fsq_<size>.pth)")
    if out.exists():
        if not out.is_dir():
            raise CLIError(f"{out}: exists and is not a folder", EXIT_FAILED)
        if out.resolve() == src.resolve():
            raise CLIError(f"{out}: output folder is the input folder", EXIT_FAILED)
        if any(out.iterdir()) and not args.overwrite:
            raise CLIError(f"{out}: folder exists and is not empty (use --overwrite to write into it)", EXIT_FAILED)
    log.info("loading %s", src)
    try:
        model = load_official(src, dtype=_dtype(args.dtype), **_official_kwargs(args))
    except Exception as e:
        log.debug("loading failed", exc_info=True)
        raise CLIError(f"cannot load official model {src}: {_reason(e, src)}") from None
    try:
        model.save_pretrained(out)
    except OSError as e:
        raise CLIError(f"{out}: cannot write: {e}", EXIT_FAILED) from None
    print(out)
    print(f"components: {', '.join(model.components)}")
    print(f"fingerprint: {model.fingerprint()}")
    return EXIT_OK


# ============================================================================================ parser


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


_EPILOG_MAIN = """\
examples:
  viq encode weights/viq-16k photos/ -o codes/ -r        every image under photos/ -> codes/**.viq
  viq decode weights/viq-16k codes/ -o recon/ -r          codes back to PNG
  viq info codes/cat.viq                                 levels, grid, bits per pixel, metadata
  viq info weights/converted_16k --json                  a model directory, as JSON
  viq convert weights/converted_16k weights/viq-16k      official release -> viq format

exit status: 0 ok, 1 some inputs failed (others were processed), 2 usage error or unloadable model.
"""

_EPILOG_ENCODE = """\
examples:
  viq encode weights/viq-16k cat.jpg dog.png -o codes/
  viq encode weights/viq-16k photos/ -o codes/ -r --device cuda --dtype bfloat16
  viq encode weights/converted_16k photos/ -o codes/ --max-pixels 262144 --multiple resize

Folders contribute their image files (%s,
any case) in sorted order; with -r also those in sub-folders, written under the same relative path
in OUTDIR. Each .viq records the model
fingerprint, the source path and the source size in its metadata. Unreadable images are reported
and skipped; the exit status is then 1.
""" % " ".join(sorted(IMAGE_EXTENSIONS))

_EPILOG_DECODE = """\
examples:
  viq decode weights/viq-16k codes/ -o recon/ -r
  viq decode weights/viq-16k cat.viq -o . --no-crop

Needs the model's drawer and vae components (and the diffusers package for the VAE).
"""

_EPILOG_INFO = """\
examples:
  viq info cat.viq
  viq info cat.viq --json | jq .bpp_file
  viq info weights/converted_16k
"""

_EPILOG_CONVERT = """\
examples:
  viq convert weights/converted_16k weights/viq-16k
  viq convert my_release/ out/ --num-heads 12 --levels 8,8,8,6,5

float32 (the default) stores the official bfloat16/float32 weights exactly.
"""


def _add_model_options(p: argparse.ArgumentParser, *, attention: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--device", default="auto", help="torch device: auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", choices=DTYPES, default="float32", help="weight / activation dtype (default: float32)")
    if attention:
        g.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto", help="attention kernel (default: auto)")
    g.add_argument("--num-heads", type=_positive_int, metavar="N", help="official directories with a non-official width only: "
                                                           "attention heads of the trunk")
    g.add_argument("--levels", type=_levels_arg, metavar="L,L,...", help="official directories only: FSQ levels, e.g. 8,8,8,6,5, when "
                                                      "they cannot be detected")


def build_parser() -> argparse.ArgumentParser:
    from viq import __version__

    parser = argparse.ArgumentParser(
        prog="viq",
        description="ViQ: encode images into discrete codes at native resolution, and back.",
        epilog=_EPILOG_MAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"viq {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a sub-command's default must not reset a -v given before the sub-command.
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("encode", parents=[common], help="images -> .viq code files",
                       description="Encode images into .viq code files, one per image, at native resolution.",
                       epilog=_EPILOG_ENCODE, formatter_class=_HelpFormatter)
    p.add_argument("model", metavar="MODEL", help="model directory (viq format or official release)")
    p.add_argument("inputs", metavar="INPUT", nargs="+", help="image files and/or folders of images")
    p.add_argument("-o", "--output", metavar="OUTDIR", required=True, help="output folder (created if needed)")
    p.add_argument("-r", "--recursive", action="store_true", help="also search sub-folders of INPUT folders")
    p.add_argument("--overwrite", action="store_true", help="re-encode images whose .viq file exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary (errors only)")
    p.add_argument("--batch-tokens", type=_positive_int, default=None, metavar="N",
                   help="patch tokens per forward pass (default: the model's, 8192)")
    g = p.add_argument_group("preprocessing (default: native resolution, area in [256, 1024*1024] pixels)")
    g.add_argument("--max-pixels", type=_positive_int, metavar="N", help="downscale larger images to at most this area")
    g.add_argument("--min-pixels", type=_positive_int, metavar="N", help="upscale smaller images to at least this area")
    g.add_argument("--multiple", choices=("pad", "resize"), help="pad (official) or resize sides to multiples of 16")
    g.add_argument("--resample", choices=("bicubic", "bilinear", "lanczos", "nearest"), help="resize filter")
    g.add_argument("--square", type=_positive_int, metavar="N",
                   help="official demo mode: shorter side -> N, centre crop N x N (N even)")
    _add_model_options(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", parents=[common], help=".viq code files -> PNG images",
                       description="Reconstruct PNG images from .viq code files.",
                       epilog=_EPILOG_DECODE, formatter_class=_HelpFormatter)
    p.add_argument("model", metavar="MODEL", help="model directory with the drawer and vae components")
    p.add_argument("inputs", metavar="INPUT", nargs="+", help=".viq files and/or folders of them")
    p.add_argument("-o", "--output", metavar="OUTDIR", required=True, help="output folder (created if needed)")
    p.add_argument("-r", "--recursive", action="store_true", help="also search sub-folders of INPUT folders")
    p.add_argument("--overwrite", action="store_true", help="re-decode files whose .png exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary (errors only)")
    p.add_argument("--no-crop", action="store_true",
                   help="keep the zero-padded canvas (multiple of 16) instead of cropping to the image size")
    _add_model_options(p)
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("info", parents=[common], help="describe a .viq file or a model directory",
                       description="Describe a .viq file (levels, grid, bits per pixel, metadata) or a model "
                                   "directory (architecture, components, parameters, fingerprint).",
                       epilog=_EPILOG_INFO, formatter_class=_HelpFormatter)
    p.add_argument("path", metavar="PATH", help=".viq file or model directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--num-heads", type=_positive_int, metavar="N", help="official directories with a non-official width only")
    p.add_argument("--levels", type=_levels_arg, metavar="L,L,...", help="official directories only: FSQ levels")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", parents=[common], help="official release directory -> viq format",
                       description="Convert an official ViQ release (model_viq_fsq_<size>.pth [+ embedder.pth, "
                                   "index_drawer.pth]) into a viq directory (config.json + model.safetensors).",
                       epilog=_EPILOG_CONVERT, formatter_class=_HelpFormatter)
    p.add_argument("official_dir", metavar="OFFICIAL_DIR", help="official release directory")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output directory")
    p.add_argument("--num-heads", type=_positive_int, metavar="N", help="attention heads of the trunk (non-official widths only)")
    p.add_argument("--levels", type=_levels_arg, metavar="L,L,...", help="FSQ levels, e.g. 8,8,8,6,5, when they cannot be detected")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="stored weight dtype (default: float32, lossless)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", parents=[common], help="train a ViQ stage from a recipe",
                       description="Run one training stage (stage1, stage2_1, stage2_2, drawer) from a YAML recipe. "
                                   "Multi-GPU: torchrun --nproc_per_node N -m viq train --config ...",
                       epilog=_EPILOG_TRAIN, formatter_class=_HelpFormatter)
    p.add_argument("--config", required=True, metavar="RECIPE", help="recipe YAML (or JSON) file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. optim.lr=3e-4")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoints/latest if present")
    p.add_argument("--stop-after", type=_positive_int, metavar="STEPS",
                   help="stop (with a checkpoint) after this many steps, keeping the schedule of the full run")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-mllm", parents=[common], help="train an LLM on stored codes (stage mllm)",
                       description="Train a multimodal LLM whose images come from a code store (viq extract): "
                                   "embedder -> projector -> LLM, no encoder in the loop. A recipe with stage: mllm "
                                   "and data.codes: STORE.", formatter_class=_HelpFormatter)
    p.add_argument("--config", required=True, metavar="RECIPE", help="recipe YAML (or JSON) file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoints/latest if present")
    p.add_argument("--stop-after", type=_positive_int, metavar="STEPS")
    p.set_defaults(func=cmd_train, require_stage="mllm")

    p = sub.add_parser("synth", parents=[common], help="write the synthetic multimodal QA set",
                       description="Generate the deterministic synthetic QA set (OCR, counting, locating, colours, "
                                   "bar charts, documents) as LLaVA JSONL + PNG images, with train/val/test splits.",
                       formatter_class=_HelpFormatter)
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--train", type=int, default=2000, help="training samples (default 2000)")
    p.add_argument("--val", type=int, default=200, help="validation samples (default 200)")
    p.add_argument("--test", type=int, default=200, help="test samples (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-side", type=_positive_int, default=64)
    p.add_argument("--max-side", type=_positive_int, default=384)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("extract", parents=[common], help="extract codes of many images into a code store",
                       description="Encode every image of an input (folder, LLaVA JSON/JSONL, WebDataset .tar shards) "
                                   "into a code store. Resumable: re-run the same command after an interruption. "
                                   "Multi-GPU: torchrun --nproc_per_node N -m viq extract ...",
                       formatter_class=_HelpFormatter)
    p.add_argument("--model", required=True, metavar="MODEL", help="model directory (viq or official)")
    p.add_argument("--input", required=True, metavar="INPUT", help="image folder, LLaVA .json/.jsonl, or .tar / folder of .tar")
    p.add_argument("--out", required=True, metavar="STORE", help="code store directory (created or appended to)")
    p.add_argument("--image-root", metavar="DIR", help="LLaVA inputs: folder the image paths are relative to")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: auto = this rank's GPU if any)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--batch-tokens", type=_positive_int, default=8192, metavar="N", help="patch tokens per forward pass")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="image decoding workers (default 2)")
    p.add_argument("--flush-every", type=_positive_int, default=256, metavar="N",
                   help="finalise a shard after this many images (at most this much work is redone after a kill)")
    p.add_argument("--entropy-coding", action="store_true", help="LZMA-compress the code shards (new stores only)")
    p.add_argument("--max-pixels", type=_positive_int, metavar="N", help="downscale larger images to at most this area")
    p.add_argument("--min-pixels", type=_positive_int, metavar="N", help="upscale smaller images to at least this area")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("store", parents=[common], help="check or summarise a code store",
                       description="Code stores (directories of code shards written by extraction).",
                       formatter_class=_HelpFormatter)
    store_sub = p.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    q = store_sub.add_parser("verify", help="checksums, index vs shards, code ranges, duplicates")
    q.add_argument("path", metavar="STORE")
    q.set_defaults(func=cmd_store_verify)
    q = store_sub.add_parser("stats", help="images, bits per pixel, code usage, entropy, perplexity")
    q.add_argument("path", metavar="STORE")
    q.add_argument("--plot", metavar="PNG", help="write the code-usage histogram to this PNG")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=cmd_store_stats)

    p = sub.add_parser("demo", parents=[common], help="train a tiny ViQ end to end on CPU and write a report",
                       description="On a fresh machine, without downloads: make a synthetic set, train a tiny LLM "
                                   "tokenizer/model, run stage 1 -> 2-1 -> 2-2 -> drawer on a tiny ViQ, then encode "
                                   "and reconstruct held-out images and real photos, and write an HTML report.",
                       formatter_class=_HelpFormatter)
    p.add_argument("-o", "--output", default="viq-demo", metavar="OUTDIR", help="output folder (default: viq-demo)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the number of training steps and samples (default 1.0: about five minutes on 2 CPU cores)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from viq.train.config import load_recipe
    from viq.train.engine import train

    try:
        cfg = load_recipe(args.config, args.overrides)
        required = getattr(args, "require_stage", None)
        if required and cfg.stage != required:
            raise ValueError(f"{args.config}: viq train-mllm needs a recipe with stage: {required} (got {cfg.stage})")
        summary = train(cfg, resume=args.resume, stop_after=args.stop_after)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e), EXIT_FAILED) from None
    if "final" in summary:
        print(summary["final"])
    return EXIT_OK


def cmd_synth(args: argparse.Namespace) -> int:
    from viq.demo.synthetic import generate

    try:
        meta = generate(args.out_dir, num_train=args.train, num_val=args.val, num_test=args.test, seed=args.seed,
                        min_side=args.min_side, max_side=args.max_side, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as e:
        raise CLIError(str(e), EXIT_FAILED) from None
    print(json.dumps(meta.get("counts", meta), indent=1))
    return EXIT_OK


def cmd_extract(args: argparse.Namespace) -> int:
    import torch

    from viq.extract import extract
    from viq.formats.image import PreprocessConfig

    pre_kwargs = {k: v for k, v in (("max_pixels", args.max_pixels), ("min_pixels", args.min_pixels)) if v}
    try:
        counts = extract(args.model, args.input, args.out, image_root=args.image_root, device=args.device,
                         dtype=getattr(torch, args.dtype), batch_tokens=args.batch_tokens, num_workers=args.workers,
                         preprocess=PreprocessConfig(**pre_kwargs), flush_every=args.flush_every,
                         entropy_coding=args.entropy_coding, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e), EXIT_FAILED) from None
    log.info("encoded %d, already stored %d, deduplicated %d, failed %d (of %d on this rank)", counts["encoded"],
             counts["existing"], counts["deduplicated"], counts["failed"], counts["images"])
    print(json.dumps(counts))
    return EXIT_FAILED if counts["failed"] else EXIT_OK


def cmd_store_verify(args: argparse.Namespace) -> int:
    from viq.store.codestore import verify_main

    return verify_main(args.path)


def cmd_store_stats(args: argparse.Namespace) -> int:
    from viq.store.codestore import stats_main

    return stats_main(args.path, plot=args.plot, as_json=args.json)


def cmd_demo(args: argparse.Namespace) -> int:
    from viq.demo.run import run_demo

    report = run_demo(Path(args.output), scale=args.scale, seed=args.seed)
    print(report)
    return EXIT_OK


_EPILOG_TRAIN = """examples:
  viq train --config recipes/demo/stage1.yaml
  viq train --config recipes/paper/stage2_2.yaml train.max_steps=20000 optim.lr=5e-5
  torchrun --nproc_per_node 8 -m viq train --config recipes/paper/stage2_2.yaml train.parallel=fsdp
  viq train --config recipe.yaml --resume            # continue after an interruption
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``viq`` command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    with _logging(args.verbose, getattr(args, "quiet", False)):
        try:
            return args.func(args)
        except CLIError as e:
            log.error("%s", e)
            return e.code
        except KeyboardInterrupt:
            log.error("interrupted")
            return 130
        except BrokenPipeError:  # e.g. `viq info x.viq --json | head`: not an error of ours
            with contextlib.suppress(OSError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())  # keep the interpreter's final flush quiet
            return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
