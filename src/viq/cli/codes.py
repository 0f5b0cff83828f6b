"""``viq encode`` (images -> one ``.viq`` file each) and ``viq decode`` (``.viq`` files -> PNG)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from viq._untrusted import LIMITS
from viq.cli.common import (
    CLIError,
    FileRun,
    HelpFormatter,
    add_model_options,
    add_preprocess_options,
    load_model,
    log,
    positive_int,
    preprocess_config,
    progress_bar,
    reason,
)
from viq.formats.image import IMAGE_EXTENSIONS

#: The extension of code files, written by ``viq encode`` and picked up in folders by ``viq decode``.
CODES_EXTENSION = ".viq"


# ============================================================================================ jobs


@dataclasses.dataclass
class _Job:
    source: Path
    output: Path


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _plan(
    inputs: Sequence[str],
    outdir: Path,
    extensions: Iterable[str],
    out_suffix: str,
    recursive: bool,
    what: str,
    run: FileRun,
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
                run.fail(
                    source,
                    f"output {output} would also be written for {first}; not overwriting it "
                    f"(rename one of the inputs or process them separately)",
                )
            return
        claimed[key] = source
        jobs.append(_Job(source, output))

    for text in inputs:
        path = Path(text)
        if path.is_dir():
            pattern = path.rglob("*") if recursive else path.iterdir()
            found = sorted(
                (
                    f
                    for f in pattern
                    if f.suffix.lower() in exts and not _is_hidden(f.relative_to(path)) and f.is_file()
                ),
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


def _skip_existing(jobs: list[_Job], overwrite: bool, run: FileRun) -> list[_Job]:
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


def _model_fingerprint(model: Any) -> str | None:
    """The code-space id of the loaded model (what ``viq encode`` writes), or None if unknown."""
    try:
        return model.fingerprint()
    except RuntimeError:
        return None


# ============================================================================================ encode


def cmd_encode(args: argparse.Namespace) -> int:
    from viq.formats.image import PreparedImage, preprocess
    from viq.model.viq import DEFAULT_BATCH_TOKENS

    outdir = Path(args.output)
    _check_outdir(outdir)
    batch_tokens = args.batch_tokens or DEFAULT_BATCH_TOKENS
    run = FileRun()
    jobs = _plan(args.inputs, outdir, IMAGE_EXTENSIONS, CODES_EXTENSION, args.recursive, "image", run)
    todo = _skip_existing(jobs, args.overwrite, run)

    model = load_model(args, ("encoder",))
    cfg = preprocess_config(args, model.patch_size)
    fingerprint = model.fingerprint()
    log.debug(
        "model %s (fingerprint %s), %d to encode, batch budget %d tokens",
        args.model,
        fingerprint,
        len(todo),
        batch_tokens,
    )

    bar = progress_bar(len(todo), "encode", args.quiet)

    def prepared() -> Iterator[tuple[tuple[_Job, PreparedImage], PreparedImage]]:
        # Prepared here rather than by the model because the .viq metadata records the source size;
        # each image goes with its key (job, image), which the model hands back with its codes.
        for job in todo:
            try:
                image = preprocess(job.source, cfg)
            except Exception as e:  # ImageError for anything unreadable; be robust to the rest too
                run.fail(job.source, reason(e, job.source))
                bar.update(1)
                continue
            yield (job, image), image

    def write(job: _Job, image: PreparedImage, codes: Any) -> None:
        meta = {"model": fingerprint, "source": str(job.source), "source_size": list(image.source_size)}
        try:
            job.output.parent.mkdir(parents=True, exist_ok=True)
            dataclasses.replace(codes, metadata=meta).save(job.output)
        except (OSError, ValueError) as e:
            run.fail(job.source, f"cannot write {job.output}: {reason(e, job.output)}")
            return
        log.debug("%s -> %s (grid %dx%d)", job.source, job.output, *codes.grid)
        run.done += 1

    try:
        for (job, image), result in model.encode_keyed(prepared(), batch_tokens=batch_tokens):
            if isinstance(result, Exception):  # EncodeError: "<source>: encoding failed: ..."
                run.fail(job.source, reason(result, job.source))
            else:
                write(job, image, result)
            bar.update(1)
    finally:
        bar.close()
    return run.finish("encoded")


# ============================================================================================ decode


def cmd_decode(args: argparse.Namespace) -> int:
    from viq.formats.codes import Codes, CodesFormatError

    outdir = Path(args.output)
    _check_outdir(outdir)
    run = FileRun()
    jobs = _plan(args.inputs, outdir, (CODES_EXTENSION,), ".png", args.recursive, ".viq", run)
    todo = _skip_existing(jobs, args.overwrite, run)

    model = load_model(args, ("drawer", "vae"))
    fingerprint = _model_fingerprint(model)
    if fingerprint is None:
        log.debug("%s: no encoder fingerprint available; not checking where the codes come from", args.model)
    foreign: list[str] = []

    bar = progress_bar(len(todo), "decode", args.quiet)
    try:
        for job in todo:
            try:
                codes = Codes.load(job.source)
            except (CodesFormatError, OSError) as e:
                run.fail(job.source, reason(e, job.source))
                bar.update(1)
                continue
            source_model = codes.metadata.get("model")
            if fingerprint is not None and isinstance(source_model, str) and source_model != fingerprint:
                if not foreign:
                    log.warning(
                        "%s: codes come from a different model (fingerprint %s, %s has %s); decoding anyway",
                        job.source,
                        source_model,
                        args.model,
                        fingerprint,
                    )
                else:
                    log.debug("%s: codes from a different model (%s)", job.source, source_model)
                foreign.append(str(job.source))
            try:
                image = model.reconstruct([codes], crop=not args.no_crop, max_pixels=args.max_pixels)[0]
            except (RuntimeError, ValueError) as e:
                run.fail(job.source, f"decoding failed: {reason(e, job.source)}")
                bar.update(1)
                continue
            try:
                job.output.parent.mkdir(parents=True, exist_ok=True)
                _atomic_save_image(image, job.output)
            except OSError as e:
                run.fail(job.source, f"cannot write {job.output}: {reason(e, job.output)}")
            else:
                log.debug("%s -> %s (%dx%d)", job.source, job.output, *image.size)
                run.done += 1
            bar.update(1)
    finally:
        bar.close()
    if len(foreign) > 1:
        log.warning("%d files come from a different model than %s", len(foreign), args.model)
    return run.finish("decoded")


# ============================================================================================ parser


_EPILOG_ENCODE = f"""\
examples:
  viq encode weights/viq-16k cat.jpg dog.png -o codes/
  viq encode weights/viq-16k photos/ -o codes/ -r --device cuda --dtype bfloat16
  viq encode weights/converted_16k photos/ -o codes/ --max-pixels 262144 --multiple resize

Folders contribute their image files ({" ".join(sorted(IMAGE_EXTENSIONS))},
any case) in sorted order; with -r also those in sub-folders, written under the same relative path
in OUTDIR. Each .viq records the model
fingerprint, the source path and the source size in its metadata. Unreadable images are reported
and skipped; the exit status is then 1.
"""

_EPILOG_DECODE = """\
examples:
  viq decode weights/viq-16k codes/ -o recon/ -r
  viq decode weights/viq-16k cat.viq -o . --no-crop

Needs the model's drawer and vae components (and the diffusers package for the VAE).
"""


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``encode`` and ``decode``."""
    p = sub.add_parser(
        "encode",
        parents=[common],
        help="images -> .viq code files",
        description="Encode images into .viq code files, one per image, at native resolution.",
        epilog=_EPILOG_ENCODE,
        formatter_class=HelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="model directory (viq format or official release)")
    p.add_argument("inputs", metavar="INPUT", nargs="+", help="image files and/or folders of images")
    p.add_argument("-o", "--output", metavar="OUTDIR", required=True, help="output folder (created if needed)")
    p.add_argument("-r", "--recursive", action="store_true", help="also search sub-folders of INPUT folders")
    p.add_argument("--overwrite", action="store_true", help="re-encode images whose .viq file exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary (errors only)")
    p.add_argument(
        "--batch-tokens",
        type=positive_int,
        default=None,
        metavar="N",
        help="patch tokens per forward pass (default: the model's, 8192)",
    )
    add_preprocess_options(p)
    add_model_options(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser(
        "decode",
        parents=[common],
        help=".viq code files -> PNG images",
        description="Reconstruct PNG images from .viq code files.",
        epilog=_EPILOG_DECODE,
        formatter_class=HelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="model directory with the drawer and vae components")
    p.add_argument("inputs", metavar="INPUT", nargs="+", help=".viq files and/or folders of them")
    p.add_argument("-o", "--output", metavar="OUTDIR", required=True, help="output folder (created if needed)")
    p.add_argument("-r", "--recursive", action="store_true", help="also search sub-folders of INPUT folders")
    p.add_argument("--overwrite", action="store_true", help="re-decode files whose .png exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary (errors only)")
    p.add_argument(
        "--no-crop",
        action="store_true",
        help="keep the zero-padded canvas (multiple of 16) instead of cropping to the image size",
    )
    p.add_argument(
        "--max-pixels",
        type=positive_int,
        default=None,
        metavar="N",
        help="refuse code files whose image is larger than N pixels, before decoding "
        f"(default {LIMITS.max_decode_pixels:,}, as Pillow refuses decompression bombs)",
    )
    add_model_options(p)
    p.set_defaults(func=cmd_decode)
