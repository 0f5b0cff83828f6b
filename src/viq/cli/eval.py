"""``viq eval-qa``: held-out QA accuracy of a trained run's final model, per task and overall, with
95 % confidence intervals (and, with ``--baselines``, the same questions with blank and shuffled
images)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

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


def _read_records(path: Path) -> list[dict]:
    """The records of a ``.jsonl`` (one per line) or ``.json`` (one list) file."""
    if not path.is_file():
        raise CLIError(f"{path}: no such data file" if not path.exists() else f"{path}: not a file")
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise CLIError(f"{path}: expected a .jsonl or .json file of LLaVA records")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"{path}: cannot read: {e}", EXIT_FAILED) from None
    if path.suffix.lower() == ".json":
        try:
            records = json.loads(text)
        except ValueError as e:
            raise CLIError(f"{path}: invalid JSON: {e}", EXIT_FAILED) from None
        if not isinstance(records, list):
            raise CLIError(f"{path}: a .json data file must hold one list of records", EXIT_FAILED)
        return records
    records = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as e:
            raise CLIError(f"{path}:{line_no}: invalid JSON: {e}", EXIT_FAILED) from None
    return records


def _fmt(result: dict) -> str:
    lo, hi = result["ci95"]
    return f"{result['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"


def _table(results: dict[str, dict]) -> str:
    """One row per task and one ``overall``; one column per image mode (accuracy [95 % CI])."""
    modes = list(results)
    tasks = sorted(results[modes[0]]["per_task"])
    if tasks == ["all"]:  # no task field in the data: the overall row says it all
        tasks = []
    width = max([len("task"), len("overall"), *(len(t) for t in tasks)])
    cell = 22
    lines = [f"{'task':<{width}}  {'n':>5}  " + "  ".join(f"{m:<{cell}}" for m in modes).rstrip()]
    for task in tasks:
        n = results[modes[0]]["per_task"][task]["n"]
        row = "  ".join(f"{_fmt(results[m]['per_task'][task]):<{cell}}" for m in modes)
        lines.append(f"{task:<{width}}  {n:>5}  {row}".rstrip())
    row = "  ".join(f"{_fmt(results[m]):<{cell}}" for m in modes)
    lines.append(f"{'overall':<{width}}  {results[modes[0]]['n']:>5}  {row}".rstrip())
    return "\n".join(lines)


def _json_result(result: dict) -> dict:
    return {"n": result["n"], "accuracy": result["accuracy"], "ci95": result["ci95"],
            "per_task": {t: {"n": r["n"], "accuracy": r["accuracy"], "ci95": r["ci95"]}
                         for t, r in result["per_task"].items()}}


def cmd_eval_qa(args: argparse.Namespace) -> int:
    from viq.data.llava import DataError
    from viq.eval.qa import evaluate_qa, load_run

    data = Path(args.data)
    all_records = _read_records(data)
    records = [r for r in all_records if isinstance(r, dict) and r.get("image")]
    if len(records) < len(all_records):
        log.info("%s: %d record(s) without an image left out", data, len(all_records) - len(records))
    if args.limit is not None:
        records = records[: args.limit]
    if not records:
        raise CLIError(f"{data}: no records with an image to ask about", EXIT_FAILED)
    image_root = Path(args.image_root) if args.image_root is not None else data.parent
    if not image_root.is_dir():
        raise CLIError(f"--image-root {image_root}: no such folder")
    device = torch_device(args.device)
    try:
        model, tokenizer = load_run(args.run, device)
    except Exception as e:  # not a run, missing LLM, bad weights, ...
        log.debug("run loading failed", exc_info=True)
        raise CLIError(f"cannot load run {args.run}: {reason(e, args.run)}", EXIT_USAGE) from None
    log.info("%s: %d question(s) with images, stage %s model from %s", data, len(records), model.stage, args.run)

    modes = ("real", "blank", "shuffled") if args.baselines else ("real",)
    results: dict[str, dict] = {}
    try:
        for mode in modes:
            if mode == "shuffled" and len(records) < 2:
                log.warning("shuffled images need at least 2 questions: skipped")
                continue
            results[mode] = evaluate_qa(model, tokenizer, records, image_root, images=mode, seed=args.seed,
                                        device=device, source=str(data))
    except (DataError, ValueError) as e:
        raise CLIError(str(e), EXIT_FAILED) from None
    print(_table(results))
    if args.json is not None:
        out = _json_result(results["real"])
        out.update({"run": str(args.run), "data": str(data), "stage": model.stage})
        if args.baselines:
            out["baselines"] = {m: _json_result(r) for m, r in results.items() if m != "real"}
        path = Path(args.json)
        try:
            if path.parent != Path(""):
                path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(out, indent=1) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            raise CLIError(f"{path}: cannot write: {e}", EXIT_FAILED) from None
    return EXIT_OK


_EPILOG = """examples:
  viq eval-qa viq-demo/runs/stage1 viq-demo/data/test.jsonl
  viq eval-qa runs/stage2_2/final test.jsonl --baselines --json qa.json
  viq eval-qa runs/mllm data.jsonl --image-root /data/images --limit 500

Image paths are relative to the data file's folder unless --image-root is given; absolute paths are
used as they are. Text-only records are left out.
"""


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``eval-qa``."""
    p = sub.add_parser("eval-qa", parents=[common], help="QA accuracy of a trained run on a LLaVA-format set",
                       description="Answer every question of a LLaVA-format set (the last question of each record "
                                   "with an image; greedy) with a training run's final model (stage1, stage2_1, "
                                   "stage2_2 or mllm), score it like the training validation (normalised exact "
                                   "match) and print the accuracy per task and overall with 95 % Wilson intervals.",
                       epilog=_EPILOG, formatter_class=HelpFormatter)
    p.add_argument("run", metavar="RUN", help="a run's output folder (train.output_dir) or its final/ folder")
    p.add_argument("data", metavar="DATA", help="LLaVA records: a .jsonl file (or a .json list)")
    p.add_argument("--json", metavar="OUT", help='write {"n", "accuracy", "ci95", "per_task"} to this file')
    p.add_argument("--limit", type=positive_int, metavar="N", help="only the first N records with an image")
    p.add_argument("--image-root", metavar="DIR", help="folder relative image paths are resolved against "
                                                      "(default: the data file's folder)")
    p.add_argument("--baselines", action="store_true",
                   help="also answer with blank (mid-grey) and shuffled (another record's) images")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled-image derangement (default 0)")
    p.set_defaults(func=cmd_eval_qa)
