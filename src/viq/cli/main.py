"""The ``viq`` command line: the parser and the dispatch; each command group lives in its own module
(:mod:`~viq.cli.codes`, :mod:`~viq.cli.info`, :mod:`~viq.cli.train`, :mod:`~viq.cli.eval`,
:mod:`~viq.cli.show`, :mod:`~viq.cli.ask`, :mod:`~viq.cli.plot`, :mod:`~viq.cli.store`).

::

    viq encode MODEL INPUT... -o OUTDIR      images / folders -> one <stem>.viq per image
    viq decode MODEL INPUT... -o OUTDIR      .viq files / folders -> one <stem>.png per file
    viq info PATH [--json]                   describe a .viq file or a model directory
    viq convert OFFICIAL_DIR OUT_DIR         official release -> viq format (config.json + safetensors)
    viq train --config RECIPE [KEY=VALUE...] one training stage (train-mllm: the LLM on stored codes)
    viq synth OUT_DIR                        the synthetic multimodal QA set
    viq demo [-o OUTDIR]                     train a tiny ViQ end to end on CPU, write a report
    viq eval-qa RUN DATA.jsonl [--json OUT]  QA accuracy of a trained run, per task, with 95 % CIs
    viq eval-recon MODEL IMAGES... [--json]  PSNR / SSIM / bpp / rFID beside JPEG and WebP at equal bpp
    viq show MODEL IMAGES... -o PAGE.html    an HTML page: reconstructions, error and code maps, codebook
    viq ask RUN IMAGE "QUESTION" [--json]    a trained run's answer to one question about an image
    viq plot RUN_DIR [-o PNG]                a run's training curves (losses, LR, code usage)
    viq extract MODEL INPUT -o STORE         many images -> a code store
    viq store verify|stats STORE             check or summarise a code store

Exit codes: 0 success; 1 some inputs failed (the others were still processed) or the command could
not complete; 2 usage error, including a model directory that cannot be loaded.

Diagnostics go through :mod:`logging` (logger ``viq``) to stderr; the output of a command proper
(``info``, ``convert``) goes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from viq._untrusted import UntrustedFileError
from viq.cli import ask, codes, info, plot, show, store, train
from viq.cli import eval as evaluation
from viq.cli.common import EXIT_FAILED, EXIT_USAGE, CLIError, log, stderr_logging

_EPILOG_MAIN = """\
examples:
  viq encode weights/viq-16k photos/ -o codes/ -r        every image under photos/ -> codes/**.viq
  viq decode weights/viq-16k codes/ -o recon/ -r          codes back to PNG
  viq info codes/cat.viq                                 levels, grid, bits per pixel, metadata
  viq info weights/converted_16k --json                  a model directory, as JSON
  viq convert weights/converted_16k weights/viq-16k      official release -> viq format

exit status: 0 ok, 1 some inputs failed (others were processed), 2 usage error or unloadable model.
"""


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

    for group in (codes, info, train, evaluation, show, ask, plot, store):
        group.add_parsers(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``viq`` command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    with stderr_logging(args.verbose, getattr(args, "quiet", False)):
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
        except OSError as e:  # a full disk, a read-only folder, a vanished file: one line naming the path
            where = f"{e.filename}: " if e.filename else ""
            log.error("%s%s", where, e.strerror or e)
            return EXIT_FAILED
        except UntrustedFileError as e:  # a file refused unread (it would run code, or declares too much)
            log.error("%s", e)
            return EXIT_FAILED
        except BaseException as e:
            # torch's checkpoint writer wraps each rank's OSError (a full disk) in a CheckpointException
            # (a BaseException).
            if isinstance(e, (SystemExit, GeneratorExit)):
                raise
            cause = _os_error_inside(e)
            if cause is None:
                raise
            where = f"{cause.filename}: " if cause.filename else ""
            log.error("%s%s (while writing a checkpoint)", where, cause.strerror or cause)
            return EXIT_FAILED


def _os_error_inside(error: BaseException) -> OSError | None:
    """The OSError a wrapper exception carries (``__cause__`` / ``__context__`` chains and
    ``torch.distributed.checkpoint``'s per-rank ``failures``), if any."""
    seen: set[int] = set()
    todo: list[object] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        todo += [getattr(e, "__cause__", None), getattr(e, "__context__", None), getattr(e, "exception", None)]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += list(failures.values())
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
