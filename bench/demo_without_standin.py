"""The demo with its SigLIP stand-in switched off: what the stand-in buys (issue 24).

Copies a finished demo's ``data/``, ``llm/`` and ``init/`` into ``--work``, replaces the init encoder
(the SigLIP stand-in, which stage 1 starts from and distils towards) by the fresh random encoder a
``viq-demo`` model of the same seed has, and runs the demo's stages and evaluation on it unchanged: same
data, LLM, pixel codec, recipes and seed. One record under ``bench/results/`` with the QA figures of
both runs (per task: real, best blind baseline, interval) and their reconstruction PSNR.

    python -m bench.demo_without_standin viq-demo
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from bench.common import write_record


def _summary(results: dict) -> dict:
    """Per stage and task: accuracy with real images, the best blind baseline, the real interval."""
    out = {}
    for stage, qa in results["qa"].items():
        out[stage] = {
            "all": qa["real"],
            "per_task": {
                task: {
                    "n": v["n"],
                    "real": v["real"],
                    "ci95": v["ci95"]["real"],
                    "best_blind": max(v["blank"], v["shuffled"], v["majority"]),
                    "reads": v.get("reads"),
                }
                for task, v in sorted(qa["per_task"].items())
            },
        }
    out["recon_psnr"] = {
        kind: results["recon"][kind]["psnr"] for kind in ("synthetic", "photos") if kind in results["recon"]
    }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished demo folder (viq demo -o RUN)")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("runs/demo-without-standin"),
        help="where the variant trains (reused: finished stages are skipped)",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="the demo's --scale (as the run was made)")
    parser.add_argument("--seed", type=int, default=0, help="the demo's --seed (as the run was made)")
    parser.add_argument("--out", default=None, help="record path (default bench/results/demo_without_standin-...json)")
    args = parser.parse_args(argv)

    from viq.demo.run import run_demo
    from viq.model.config import get_preset
    from viq.model.viq import ViQModel

    run, work = args.run.resolve(), args.work.resolve()
    if not (run / "results.json").is_file():
        parser.error(f"{run}: not a finished demo (no results.json)")
    if not (work / "init" / "model.safetensors").is_file():
        work.mkdir(parents=True, exist_ok=True)
        for part in ("data", "llm"):
            shutil.rmtree(work / part, ignore_errors=True)
            shutil.copytree(run / part, work / part)
        init = ViQModel.from_pretrained(run / "init")
        init.encoder.load_state_dict(ViQModel.from_config(get_preset("viq-demo"), seed=args.seed).encoder.state_dict())
        staging = work / "init.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        init.save_pretrained(staging)
        for name in ("vae_history.json", "siglip.json"):
            shutil.copy(run / "init" / name, staging / name)
        staging.rename(work / "init")  # complete or absent: prepare_demo skips an init that exists
    run_demo(work, scale=args.scale, seed=args.seed)

    record = {
        "run": str(run),
        "work": str(work),
        "scale": args.scale,
        "seed": args.seed,
        "with_standin": _summary(json.loads((run / "results.json").read_text())),
        "without_standin": _summary(json.loads((work / "results.json").read_text())),
    }
    path = write_record("demo_without_standin", torch.device("cpu"), record, out=args.out)
    for label in ("with_standin", "without_standin"):
        final = record[label]["final"]
        print(
            f"{label:16s} final {100 * final['all']:.1f} %: "
            + ", ".join(
                f"{t} {100 * v['real']:.0f} (blind {100 * v['best_blind']:.0f})" for t, v in final["per_task"].items()
            )
            + f"; PSNR {record[label]['recon_psnr'].get('synthetic', float('nan')):.2f} dB"
        )
    print(path)
    return record


if __name__ == "__main__":
    main()
