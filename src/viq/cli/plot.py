"""``viq plot``: the training curves of a run (each loss term, learning rates, code usage) from its
``metrics.jsonl``, as a PNG."""

from __future__ import annotations

import argparse

from viq.cli.common import EXIT_FAILED, EXIT_OK, CLIError, HelpFormatter


def cmd_plot(args: argparse.Namespace) -> int:
    from viq.train.curves import plot_curves

    try:
        out = plot_curves(args.run, args.output)
    except FileNotFoundError as e:
        raise CLIError(
            f"{e} (viq plot reads the metrics.jsonl that training writes in train.output_dir)", EXIT_FAILED
        ) from None
    except ValueError as e:
        raise CLIError(str(e), EXIT_FAILED) from None
    except ImportError as e:
        raise CLIError(f"viq plot needs matplotlib (pip install matplotlib): {e}", EXIT_FAILED) from None
    print(out)
    return EXIT_OK


_EPILOG = """examples:
  viq plot runs/stage2_2                      -> runs/stage2_2/curves.png
  viq plot viq-demo/runs/stage1 -o stage1.png
"""


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``plot``."""
    p = sub.add_parser(
        "plot",
        parents=[common],
        help="draw a run's training curves from its metrics.jsonl",
        description="Draw the loss (total and each term, validation as markers), the learning rate "
        "of each module group and the code usage of a training run from RUN_DIR/"
        "metrics.jsonl into one PNG.",
        epilog=_EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument("run", metavar="RUN_DIR", help="a run's output folder (train.output_dir)")
    p.add_argument("-o", "--output", metavar="PNG", help="output image (default: RUN_DIR/curves.png)")
    p.set_defaults(func=cmd_plot)
