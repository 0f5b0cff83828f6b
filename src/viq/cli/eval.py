"""``viq eval-qa``: held-out QA accuracy of a trained run's final model, per task and overall, with
95 % confidence intervals (and, with ``--baselines``, the same questions with blank and shuffled
images).

``viq eval-recon``: reconstruction quality of a model on images (PSNR / SSIM on the encoded area,
bits per pixel of the ``.viq`` file, code usage, optional rFID) beside JPEG and WebP at the same
bitrate; a table, and optionally JSON, a rate-distortion plot and a comparison grid
(:func:`viq.eval.recon.evaluate_reconstruction` does the work)."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from viq.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CLIError,
    FileRun,
    HelpFormatter,
    add_model_options,
    add_preprocess_options,
    int_list_arg,
    list_images,
    load_model,
    log,
    positive_int,
    preprocess_config,
    progress_bar,
    reason,
    torch_device,
    write_output,
)


def _read_records(path: Path) -> list[dict]:
    """The records of a ``.jsonl`` (one per line) or ``.json`` (one list) file (the training reader's)."""
    from viq.data.llava import DataError, read_json_records

    try:
        return read_json_records(path)
    except (DataError, OSError) as e:
        raise CLIError(str(e), EXIT_FAILED) from None


def _fmt(result: dict) -> str:
    lo, hi = result["ci95"]
    return f"{result['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"


def _table(results: dict[str, dict], nll: dict[str, dict] | None = None) -> str:
    """One row per task and one ``overall``; one column per image mode (accuracy [95 % CI]), then the
    answer NLL (nats per answer token) per image mode in ``nll``."""
    modes = list(results)
    nll = nll or {}
    tasks = sorted(results[modes[0]]["per_task"])
    if tasks == ["all"]:  # no task field in the data: the overall row says it all
        tasks = []
    width = max([len("task"), len("overall"), *(len(t) for t in tasks)])
    cell = 22
    header = "  ".join(f"{m:<{cell}}" for m in modes) + "".join(f"  {'nll ' + m:>10}" for m in nll)
    lines = [f"{'task':<{width}}  {'n':>5}  " + header.rstrip()]
    for task in tasks:
        n = results[modes[0]]["per_task"][task]["n"]
        row = "  ".join(f"{_fmt(results[m]['per_task'][task]):<{cell}}" for m in modes)
        row += "".join(f"  {r['per_task'][task]['nll']:>10.3f}" for r in nll.values())
        lines.append(f"{task:<{width}}  {n:>5}  {row}".rstrip())
    row = "  ".join(f"{_fmt(results[m]):<{cell}}" for m in modes) + "".join(
        f"  {r['nll']:>10.3f}" for r in nll.values()
    )
    lines.append(f"{'overall':<{width}}  {results[modes[0]]['n']:>5}  {row}".rstrip())
    return "\n".join(lines)


def _json_result(result: dict) -> dict:
    return {
        "n": result["n"],
        "accuracy": result["accuracy"],
        "ci95": result["ci95"],
        "per_task": {
            t: {"n": r["n"], "accuracy": r["accuracy"], "ci95": r["ci95"]} for t, r in result["per_task"].items()
        },
    }


def cmd_eval_qa(args: argparse.Namespace) -> int:
    from viq.data.llava import DataError
    from viq.eval.qa import answer_nll, evaluate_qa, load_run

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
            results[mode] = evaluate_qa(
                model,
                tokenizer,
                records,
                image_root,
                images=mode,
                seed=args.seed,
                device=device,
                source=str(data),
                batch_size=args.batch_size,
            )
        # Does the image change how likely the right answer is? (real vs blank, nats per answer token)
        nll = {
            mode: answer_nll(
                model,
                tokenizer,
                records,
                image_root,
                images=mode,
                device=device,
                source=str(data),
                batch_size=args.batch_size,
            )
            for mode in modes
            if mode != "shuffled" and args.baselines
        }
    except (DataError, ValueError) as e:
        raise CLIError(str(e), EXIT_FAILED) from None
    print(_table(results, nll))
    if args.json is not None:
        out = _json_result(results["real"])
        out.update({"run": str(args.run), "data": str(data), "stage": model.stage})
        if args.baselines:
            out["baselines"] = {m: _json_result(r) for m, r in results.items() if m != "real"}
            out["nll"] = {
                m: {"nll": r["nll"], "per_task": {t: v["nll"] for t, v in r["per_task"].items()}}
                for m, r in nll.items()
            }
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


# ============================================================================================ eval-recon


def _recon_table(result: dict) -> str:
    """One row per method: bpp, PSNR, SSIM and what qualifies the numbers."""
    from viq.eval.rate_distortion import BPP_TOLERANCE, CODEC_LABELS

    def num(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    usage = result["usage"]
    rows = [
        (
            "ViQ codes",
            result,
            f"entropy {usage['entropy_bits']:.2f} of {usage['log2_codebook']:.0f} bits/code, "
            f"{usage['usage']:.2%} of the codebook used",
        )
    ]
    for codec in ("jpeg", "webp"):
        if codec in result:
            r = result[codec]
            others = ", ".join(f"{k} {v}" for k, v in sorted(r["status"].items()) if k != "matched")
            note = f"mean quality {num(r['quality'], '.1f')}, {r['matched']}/{r['n']} within {BPP_TOLERANCE:.0%} of the codes' bpp"
            rows.append((CODEC_LABELS[codec], r, note + (f" ({others})" if others else "")))
    lines = [f"{'method':<10} {'bpp':>7} {'PSNR dB':>8} {'SSIM':>6} {'seams':>6}  notes"]
    for name, r, note in rows:
        lines.append(
            f"{name:<10} {num(r['bpp'], '.4f'):>7} {num(r['psnr'], '.2f'):>8} {num(r['ssim'], '.3f'):>6} "
            f"{num(r.get('seams'), '.2f'):>6}  {note}"
        )
    if result["fid_features"] is not None:
        lines.append(
            f"rFID ({result['fid_features']} features): {num(result['rfid'], '.3f')}"
            + (" (needs at least 2 images)" if result["rfid"] is None else "")
        )
    return "\n".join(lines)


def _json_safe(value):
    """``inf`` / ``nan`` -> None, recursively (JSON has no such numbers; a lossless PSNR is inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def cmd_eval_recon(args: argparse.Namespace) -> int:
    from viq.eval.rate_distortion import comparison_grid, plot_rate_distortion
    from viq.eval.recon import evaluate_reconstruction

    run = FileRun()
    files = list_images(args.images, run)
    model = load_model(args, ("encoder", "drawer", "vae"))
    cfg = preprocess_config(args, model.patch_size)
    extractor = None
    if args.fid_features is not None:
        from viq.eval.fid import load_feature_extractor

        try:
            extractor = load_feature_extractor(args.fid_features, model, device=model.device)
        except (ImportError, FileNotFoundError, OSError, ValueError) as e:
            log.debug("feature extractor loading failed", exc_info=True)
            raise CLIError(f"--fid-features {args.fid_features}: {e}") from None
    log.info("%d image(s) to evaluate with %s", len(files), args.model)
    bar = progress_bar(len(files), "eval-recon", args.quiet)

    def failed(source: str, error: Exception) -> None:
        run.fail(source, reason(error, source))

    try:
        result = evaluate_reconstruction(
            model,
            [str(f) for f in files],
            preprocess=cfg,
            fid_features=extractor,
            curve_qualities=args.qualities,
            examples=args.grid_images if args.grid else 0,
            on_error=failed,
            progress=bar.update,
        )
    finally:
        bar.close()
    if extractor is not None:
        result["fid_features"] = args.fid_features
    examples = result.pop("examples", [])
    if result["n"]:
        print(_recon_table(result))
    if args.json is not None:
        out = _json_safe({"model": str(args.model), **result})
        write_output(Path(args.json), (json.dumps(out, indent=1, allow_nan=False) + "\n").encode(), "JSON results")
    if args.plot is not None and result["n"]:
        write_output(Path(args.plot), lambda tmp: plot_rate_distortion(result, tmp), "plot")
    if args.grid is not None and examples:
        grid = comparison_grid(examples)
        write_output(Path(args.grid), lambda tmp: grid.save(tmp, format="PNG"), "grid")
    if not result["n"] and not run.failures:
        raise CLIError("no images to evaluate", EXIT_FAILED)
    log.info("evaluated %d, failed %d", result["n"], len(run.failures))
    if run.failures:
        log.error("%d file(s) failed:%s", len(run.failures), "".join(f"\n  {src}: {why}" for src, why in run.failures))
        return EXIT_FAILED
    return EXIT_OK


_EPILOG = """examples:
  viq eval-qa viq-demo/runs/stage1 viq-demo/data/test.jsonl
  viq eval-qa runs/stage2_2/final test.jsonl --baselines --json qa.json
  viq eval-qa runs/mllm data.jsonl --image-root /data/images --limit 500

Image paths are relative to the data file's folder unless --image-root is given; absolute paths are
used as they are. Text-only records are left out.
"""


def _qualities(text: str) -> tuple[int, ...]:
    return int_list_arg(text, low=1, high=100, plural="qualities", example="5,20,50", each="quality")


_EPILOG_RECON = """examples:
  viq eval-recon weights/viq-16k photos/ --json recon.json --plot rd.png --grid grid.png
  viq eval-recon weights/viq-16k a.jpg b.png --max-pixels 262144 --fid-features viq
  viq eval-recon weights/viq-16k val/ --fid-features hf:google/siglip2-base-patch16-224 --device cuda

bpp is the whole .viq file (header + payload + CRC, no metadata) over the pixels as encoded;
JPEG / WebP files are measured the same way. Unreadable images are reported and left out; the exit
status is then 1.
"""


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``eval-qa`` and ``eval-recon``."""
    p = sub.add_parser(
        "eval-qa",
        parents=[common],
        help="QA accuracy of a trained run on a LLaVA-format set",
        description="Answer every question of a LLaVA-format set (the last question of each record "
        "with an image; greedy) with a training run's final model (stage1, stage2_1, "
        "stage2_2 or mllm), score it like the training validation (normalised exact "
        "match) and print the accuracy per task and overall with 95 % Wilson intervals.",
        epilog=_EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="a run's output folder (train.output_dir) or its final/ folder")
    p.add_argument("data", metavar="DATA", help="LLaVA records: a .jsonl file (or a .json list)")
    p.add_argument("--json", metavar="OUT", help='write {"n", "accuracy", "ci95", "per_task"} to this file')
    p.add_argument("--limit", type=positive_int, metavar="N", help="only the first N records with an image")
    p.add_argument(
        "--image-root",
        metavar="DIR",
        help="folder relative image paths are resolved against (default: the data file's folder)",
    )
    p.add_argument(
        "--baselines",
        action="store_true",
        help="also answer with blank (mid-grey) and shuffled (another record's) images, and give the "
        "answer NLL (nats per answer token) with real and blank images",
    )
    p.add_argument("--device", default="auto", help="torch device: auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled-image derangement (default 0)")
    p.add_argument(
        "--batch-size", type=positive_int, default=32, metavar="N", help="questions answered together (default 32)"
    )
    p.set_defaults(func=cmd_eval_qa)

    p = sub.add_parser(
        "eval-recon",
        parents=[common],
        help="reconstruction quality beside JPEG / WebP at equal bpp",
        description="Encode and reconstruct every image with a model and score the reconstruction "
        "on the encoded area (PSNR, SSIM; torchmetrics), with the bits per pixel of its "
        ".viq file, code usage and entropy, optionally rFID, and the same images as JPEG "
        "and WebP at the codes' bitrate (quality searched per image).",
        epilog=_EPILOG_RECON,
        formatter_class=HelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="model directory with the encoder, drawer and vae components")
    p.add_argument("images", metavar="IMAGES", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument(
        "--json",
        metavar="OUT",
        help='write {"n", "bpp", "psnr", "ssim", "rfid", "jpeg", "webp", ..., "images": [per image]} to this file',
    )
    p.add_argument("--plot", metavar="OUT.png", help="PSNR against bpp: ViQ as a point, JPEG and WebP as curves")
    p.add_argument("--grid", metavar="OUT.png", help="input | reconstruction | JPEG at equal bpp, side by side")
    p.add_argument(
        "--grid-images", type=positive_int, default=4, metavar="N", help="images (the first N) in --grid (default 4)"
    )
    p.add_argument(
        "--qualities",
        type=_qualities,
        metavar="Q,Q,...",
        help="JPEG / WebP qualities of the --plot curves (default 2,5,10,20,30,50,70,90)",
    )
    p.add_argument(
        "--fid-features",
        metavar="SPEC",
        help="also compute rFID with these features: viq, hf:<dir or hub id>, timm:<hub id or arch=file>, "
        "open_clip:<hub id or arch=file> (local or cached only; nothing is downloaded)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary (errors only)")
    add_preprocess_options(p)
    add_model_options(p)
    p.set_defaults(func=cmd_eval_recon)
