"""``viq train`` / ``viq train-mllm`` (one training stage from a recipe), ``viq synth`` (the synthetic QA
set) and ``viq demo`` (the whole pipeline, tiny, on CPU)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from viq.cli.common import EXIT_FAILED, EXIT_OK, CLIError, HelpFormatter, positive_int


def cmd_train(args: argparse.Namespace) -> int:
    from viq.launch import resolve_distributed
    from viq.train.config import load_recipe
    from viq.train.engine import train

    try:
        launch = resolve_distributed(args.rank, args.world_size, args.local_rank)
        cfg = load_recipe(args.config, args.overrides)
        required = getattr(args, "require_stage", None)
        if required and cfg.stage != required:
            raise ValueError(f"{args.config}: viq train-mllm needs a recipe with stage: {required} (got {cfg.stage})")
        summary = train(cfg, resume=args.resume, stop_after=args.stop_after, launch=launch)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e), EXIT_FAILED) from None
    if "final" in summary:
        print(summary["final"])
    return EXIT_OK


def cmd_synth(args: argparse.Namespace) -> int:
    from viq.demo.synthetic import generate

    try:
        if args.demo:
            from viq.demo.run import generate_demo_set

            out = Path(args.out_dir)
            if out.is_dir() and any(out.iterdir()) and not args.overwrite:
                raise FileExistsError(f"{out} is not empty (pass --overwrite to replace the dataset)")
            meta = generate_demo_set(out, num_train=args.train, num_val=args.val, num_test=args.test, seed=args.seed)
        else:
            meta = generate(
                args.out_dir,
                num_train=args.train,
                num_val=args.val,
                num_test=args.test,
                seed=args.seed,
                min_side=args.min_side,
                max_side=args.max_side,
                overwrite=args.overwrite,
            )
    except (ValueError, FileExistsError) as e:
        raise CLIError(str(e), EXIT_FAILED) from None
    print(json.dumps(meta.get("counts", meta), indent=1))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from viq.demo.run import run_demo

    report = run_demo(Path(args.output), scale=args.scale, seed=args.seed)
    print(report)
    return EXIT_OK


_EPILOG_TRAIN = """examples:
  viq train --config recipes/demo/stage1.yaml
  viq train --config recipes/paper/stage2_2.yaml train.max_steps=20000 optim.lr=5e-5
  torchrun --nproc_per_node 8 -m viq train --config recipes/paper/stage2_2.yaml train.parallel=fsdp
  srun --ntasks 16 --gpus-per-task 1 viq train --config recipes/paper/stage2_2.yaml train.parallel=fsdp
  MASTER_ADDR=node0 viq train --config recipe.yaml --rank 1 --world-size 2   # one command per process
  viq train --config recipe.yaml --resume            # continue after an interruption (any number of processes)
"""


def _add_launch_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rank",
        type=int,
        metavar="R",
        help="this process's rank (default: from torchrun / SLURM / OpenMPI, else 0); give with --world-size",
    )
    p.add_argument(
        "--world-size",
        type=positive_int,
        metavar="W",
        help="number of training processes; they meet at MASTER_ADDR:MASTER_PORT (default 127.0.0.1:29500)",
    )
    p.add_argument(
        "--local-rank",
        type=int,
        metavar="L",
        help="this process's GPU on its node (default: from the launcher, else 0)",
    )


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``train``, ``train-mllm``, ``synth`` and ``demo``."""
    p = sub.add_parser(
        "train",
        parents=[common],
        help="train a ViQ stage from a recipe",
        description="Run one training stage (stage1, stage2_1, stage2_2, drawer) from a YAML recipe. "
        "Multi-GPU: torchrun --nproc_per_node N -m viq train --config ... (or srun, mpirun, "
        "or one command per process with --rank / --world-size).",
        epilog=_EPILOG_TRAIN,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--config", required=True, metavar="RECIPE", help="recipe YAML (or JSON) file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. optim.lr=3e-4")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoints/latest if present")
    p.add_argument(
        "--stop-after",
        type=positive_int,
        metavar="STEPS",
        help="stop (with a checkpoint) after this many steps, keeping the schedule of the full run",
    )
    _add_launch_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "train-mllm",
        parents=[common],
        help="train an LLM on stored codes (stage mllm)",
        description="Train a multimodal LLM whose images come from a code store (viq extract): "
        "embedder -> projector -> LLM, no encoder in the loop. A recipe with stage: mllm "
        "and data.codes: STORE.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--config", required=True, metavar="RECIPE", help="recipe YAML (or JSON) file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoints/latest if present")
    p.add_argument("--stop-after", type=positive_int, metavar="STEPS")
    _add_launch_flags(p)
    p.set_defaults(func=cmd_train, require_stage="mllm")

    p = sub.add_parser(
        "synth",
        parents=[common],
        help="write the synthetic multimodal QA set",
        description="Generate the deterministic synthetic QA set (OCR, counting, locating, colours, "
        "bar charts, documents) as LLaVA JSONL + PNG images, with train/val/test splits.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--train", type=int, default=2000, help="training samples (default 2000)")
    p.add_argument("--val", type=int, default=200, help="validation samples (default 200)")
    p.add_argument("--test", type=int, default=200, help="test samples (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-side", type=positive_int, default=64)
    p.add_argument("--max-side", type=positive_int, default=384)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--demo",
        action="store_true",
        help="the demo's set: its task mix (shape, colour, position, count, digit), 48-64 px images, one "
        "question each (--min-side / --max-side are ignored); e.g. a fresh-seed test set for a demo "
        "run: viq synth fresh --demo --seed 1 --train 0 --val 0 --test 1000",
    )
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "demo",
        parents=[common],
        help="train a tiny ViQ end to end on CPU and write a report",
        description="On a fresh machine, without downloads: make a synthetic set, train a tiny LLM "
        "tokenizer/model, run stage 1 -> 2-1 -> 2-2 -> drawer on a tiny ViQ, then encode "
        "and reconstruct held-out images and real photos, and write an HTML report.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("-o", "--output", default="viq-demo", metavar="OUTDIR", help="output folder (default: viq-demo)")
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply the number of training steps and samples (default 1.0: about five minutes on 2 CPU cores)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
