"""``viq ask``: one question about one image, answered by a trained run (greedy, the generation path
of ``viq eval-qa``)."""

from __future__ import annotations

import argparse
import json

from viq.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CLIError,
    HelpFormatter,
    log,
    positive_int,
    reason,
    torch_device,
)


def cmd_ask(args: argparse.Namespace) -> int:
    from viq.eval.ask import Asker
    from viq.formats.image import ImageError

    device = torch_device(args.device)
    try:
        asker = Asker.from_run(args.run, device)
    except Exception as e:  # not a run, a stage without LLM, missing LLM, bad weights, ...
        log.debug("run loading failed", exc_info=True)
        raise CLIError(f"cannot load run {args.run}: {reason(e, args.run)}", EXIT_USAGE) from None
    try:
        answer = asker.ask(args.image, args.question, max_new_tokens=args.max_new_tokens)
    except ImageError as e:
        raise CLIError(f"{args.image}: cannot read the image: {reason(e, args.image)}", EXIT_FAILED) from None
    except ValueError as e:
        raise CLIError(str(e), EXIT_USAGE) from None
    if args.json:
        print(
            json.dumps(
                {
                    "run": str(args.run),
                    "stage": asker.stage,
                    "image": str(args.image),
                    "question": args.question,
                    "answer": answer,
                }
            )
        )
    else:
        print(answer)
    return EXIT_OK


_EPILOG = """examples:
  viq ask viq-demo/runs/stage2_2 photo.png "What color is the shape?"
  viq ask runs/stage1/final chart.png "What is the value of the tallest bar?" --max-new-tokens 16 --json

The image is preprocessed as the run's recipe did at the end of training; the answer is greedy.
"""


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``ask``."""
    p = sub.add_parser(
        "ask",
        parents=[common],
        help="ask a trained run a question about an image",
        description="Answer a question about an image with a training run's final model (stage1, "
        "stage2_1, stage2_2 or mllm): greedy generation, as viq eval-qa does.",
        epilog=_EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="a run's output folder (train.output_dir) or its final/ folder")
    p.add_argument("image", metavar="IMAGE", help="the image file")
    p.add_argument("question", metavar="QUESTION", help="the question (quote it)")
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=64, metavar="N", help="generation budget in tokens (default 64)"
    )
    p.add_argument(
        "--json", action="store_true", help='print {"run", "stage", "image", "question", "answer"} as one JSON line'
    )
    p.add_argument("--device", default="auto", help="torch device: auto (cuda if available), cpu, cuda, ...")
    p.set_defaults(func=cmd_ask)
