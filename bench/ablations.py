"""The paper's Table-4 ablations at demo scale (issue 11): each variant of the demo recipes trained per
seed with our own trainer, and judged by the demo's own evaluation (:mod:`viq.demo.evaluation`).

A *variant* is a name and a list of recipe overrides, each for one stage, a comma list of stages or all
of them::

    stage2_2:model.config.head.rope=false            # one stage
    stage2_1,stage2_2:loss.recon=0                   # two stages
    optim.lr=5e-4                                    # every stage (same as all:optim.lr=5e-4)
    skip=stage2_1                                    # leave a stage out (the next starts from the one before)
    until=stage1                                     # stop after a stage (stage1: the continuous reference)

``--variant NAME TOKEN ...`` adds one from the command line (repeatable; ``--axes`` picks the default
ones to keep). Every key is checked against the recipe and model config classes before anything runs.

What does not depend on a variant is made once per seed under ``--work``: the synthetic QA set, the tiny
LLM, the pixel codec (:func:`viq.demo.run.prepare_demo`), and every stage run, cached under a key of its
recipe overrides and of the run it starts from -- so variants that change only stage 2-2 share stage 1
and stage 2-1.

Per (variant, seed) a record under ``--results`` (default ``bench/results/ablations/<label>/``): QA
accuracy of the last LLM stage (stage 2-2, answering from codes; stage 1 for the reference) with real,
blank images and the majority answer, with Wilson intervals; reconstruction PSNR / SSIM of
held-out synthetic images and photographs beside the pixel codec alone (the ceiling); code entropy;
training time. Reconstruction is drawn by stage 2-2's own latent decoder (the drawer its output carries),
or, with ``--drawer`` and for variants whose stage 2-2 has no latent loss, by a drawer trained on the
frozen codes as in the demo. ``summary.json``: per variant and metric the mean and a 95 % t-interval over seeds, and per
variant its paired difference from the control (same seed: same data, LLM, codec and stage 1).

    python -m bench.ablations                               # the default axes, 3 seeds
    python -m bench.ablations --axes position recon --seeds 0 1 --scale 0.25
    python -m bench.ablations --variant wide stage2_1,stage2_2:model.config.head.bottleneck_dim=64
    python -m bench.ablations --smoke                       # 2 variants, 1 seed, tiny (the test)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from bench.ablation_summary import CONTROL, markdown_table, print_table, write_summary
from bench.ablation_variants import AXES, Variant, check_variant, default_variants, parse_variant

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "ablations"

log = logging.getLogger("ablations")

# ---------------------------------------------------------------------------------------------- training


def _stage_key(stage: str, parent: str | None, overrides: list[str], scale: float, seed: int, device: str) -> str:
    text = json.dumps(
        {"stage": stage, "parent": parent, "overrides": overrides, "scale": scale, "seed": seed, "device": device},
        sort_keys=True,
    )
    return f"{stage}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


#: the step counts stage_overrides scales by --scale (a variant's value for them is scaled too)
SCALED_KEYS = ("train.max_steps", "model.head_warmup_steps")


def run_overrides(stage: str, extra: list[str], seed_dir: Path, *, scale: float, seed: int) -> list[str]:
    """The demo's overrides of ``stage`` for the seed folder, then the variant's ``extra``; step counts
    (the variant's own where it sets them: :data:`SCALED_KEYS`) scaled by ``scale`` as the demo scales."""
    from viq.demo.run import recipe_path, stage_overrides
    from viq.train.config import load_recipe

    base = load_recipe(recipe_path(stage), extra)
    demo = stage_overrides(stage, seed_dir, scale, seed, base.train.max_steps, base.model.head_warmup_steps)
    scaled = {kv.split("=", 1)[0] for kv in demo} & set(SCALED_KEYS)
    return [*demo, *(kv for kv in extra if kv.split("=", 1)[0].strip() not in scaled)]


def train_chain(variant: Variant, seed_dir: Path, *, scale: float, seed: int, device: str) -> list[dict]:
    """Train (or reuse) the variant's stages; returns one entry per stage: key, dir, time, reused."""
    from viq.demo.run import recipe_path
    from viq.train.config import load_recipe
    from viq.train.engine import train

    entries: list[dict] = []
    parent_key: str | None = None
    parent_final = seed_dir / "init"
    for stage in variant.chain():
        extra = variant.stage_overrides(stage)
        key = _stage_key(stage, parent_key, extra, scale, seed, device)
        run_dir = seed_dir / "stages" / key
        final = run_dir / "final"
        reused = (final / "stage.json").is_file()
        if not reused:
            log.info("%s seed %d: training %s -> %s", variant.name, seed, stage, run_dir)
            overrides = [
                *run_overrides(stage, extra, seed_dir, scale=scale, seed=seed),
                f"model.init=viq:{parent_final}",
                f"train.output_dir={run_dir}",
                "train.progress=false",
            ]
            t = time.perf_counter()
            train(load_recipe(recipe_path(stage), overrides))
            (run_dir / "ablation_stage.json").write_text(
                json.dumps(
                    {
                        "stage": stage,
                        "key": key,
                        "parent": parent_key,
                        "overrides": extra,
                        "train_s": time.perf_counter() - t,
                        "steps": load_recipe(recipe_path(stage), overrides).train.max_steps,
                        "seed": seed,
                        "scale": scale,
                        "device": device,
                    },
                    indent=1,
                )
            )
        info = (
            json.loads((run_dir / "ablation_stage.json").read_text())
            if (run_dir / "ablation_stage.json").is_file()
            else {}
        )
        entries.append(
            {
                "stage": stage,
                "key": key,
                "dir": str(run_dir),
                "overrides": extra,
                "reused": reused,
                "train_s": info.get("train_s"),
                "steps": info.get("steps"),
            }
        )
        parent_key, parent_final = key, final
    return entries


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate_run(
    variant: Variant,
    chain: list[dict],
    seed_dir: Path,
    run_out: Path,
    *,
    seed: int,
    device,
    num_images: int,
    num_photos: int,
    num_questions: int | None = None,
) -> dict[str, Any]:
    """QA of the last LLM stage, reconstruction + codes of the drawer (when trained), with the demo's
    evaluation functions."""
    import viq
    from viq.demo.evaluation import (
        code_summary,
        evaluate_qa_with_baselines,
        evaluate_reconstruction,
    )
    from viq.demo.photos import list_photos, load_photo
    from viq.demo.run import DEMO_MAX_PIXELS
    from viq.demo.synthetic import load_split

    data = seed_dir / "data"
    dirs = {e["stage"]: Path(e["dir"]) for e in chain}
    test = [r for r in load_split(data, "test") if "image" in r]
    questions = test[:num_questions] if num_questions else test
    llm_stage = "stage2_2" if "stage2_2" in dirs else ("stage2_1" if "stage2_1" in dirs else "stage1")
    # Real and blank images (what the codes carry) and the majority answer; the demo adds shuffled images.
    qa = evaluate_qa_with_baselines(
        dirs[llm_stage] / "final",
        load_split(data, "train"),
        questions,
        data,
        seed=seed,
        device=device,
        modes=("real", "blank"),
    )
    qa.pop("examples", None)
    qa["stage"] = llm_stage
    out: dict[str, Any] = {"qa": qa, "recon": None, "codes": None, "recon_from": None}
    # Reconstruction from the trained drawer, else from the last discrete stage's own latent decoder (its
    # output's drawer is the dequantize path + that decoder, as the official converter makes it).
    drawn = next((s for s in ("drawer", "stage2_2") if s in dirs and _has_codes(dirs[s] / "final")), None)
    if drawn is not None:
        out["recon_from"] = drawn
        model = viq.load(dirs[drawn] / "final")
        synthetic = [(Path(r["image"]).stem, str(data / r["image"])) for r in test[:num_images]]
        photos = [(p.file_stem, load_photo(p)) for p in list_photos()[:num_photos]]
        recon_syn, _, hist = evaluate_reconstruction(
            model, synthetic, run_out / "reconstructions", max_pixels=DEMO_MAX_PIXELS, kind="test"
        )
        recon_photo, _, hist_photo = evaluate_reconstruction(
            model, photos, run_out / "reconstructions", max_pixels=DEMO_MAX_PIXELS, kind="photo"
        )
        out["recon"] = {"synthetic": recon_syn, "photos": recon_photo}
        out["codes"] = code_summary(hist + hist_photo)
        out["codes"]["codebook_size"] = model.config.head.codebook_size
    return out


def _seconds_per_step(chain: list[dict], stages: tuple[str, ...]) -> float | None:
    """Training seconds per step over the given stages of a chain (stage start-up included)."""
    picked = [e for e in chain if e["stage"] in stages and e.get("train_s") and e.get("steps")]
    return sum(e["train_s"] for e in picked) / sum(e["steps"] for e in picked) if picked else None


def _has_codes(final: Path) -> bool:
    """Whether the stage output ``final`` quantizes with a discrete quantizer (any registered kind with a
    codebook: FSQ, SimVQ, ...), so that it encodes and its drawer reconstructs."""
    from viq.model.config import ViQConfig

    config = final / "config.json"
    return config.is_file() and ViQConfig.load(config).head.codebook_size > 0


# ---------------------------------------------------------------------------------------------- main


def _label(args) -> str:
    if args.label:
        return args.label
    return "smoke" if args.smoke else f"scale{args.scale:g}-{args.device}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--axes",
        nargs="*",
        choices=AXES,
        default=None,
        help="default axes to run (default: all; the control always runs)",
    )
    parser.add_argument("--only", nargs="*", default=None, help="run only these variants (names)")
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=[],
        metavar=("NAME", "TOKEN"),
        help="add a variant: NAME then STAGE[,STAGE]:KEY=VALUE, KEY=VALUE (all stages), skip=STAGE, until=STAGE",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="TOKEN",
        help="overrides added to every variant (same syntax as --variant), e.g. train.batch_size=8",
    )
    parser.add_argument("--no-defaults", action="store_true", help="run only the control and --variant ones")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--scale", type=float, default=1.0, help="step / data multiplier of the demo recipes (1: the demo's own budget)"
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--work", default=None, help="work dir for data, models and stage runs (default runs/ablations/<label>)"
    )
    parser.add_argument(
        "--results", default=None, help="records + summary.json (default bench/results/ablations/<label>)"
    )
    parser.add_argument("--label", default=None)
    parser.add_argument("--num-images", type=int, default=32, help="held-out synthetic images reconstructed")
    parser.add_argument("--num-photos", type=int, default=8)
    parser.add_argument(
        "--num-questions",
        type=int,
        default=None,
        help="held-out questions answered (default: all of the test split, 240 at scale >= 1)",
    )
    parser.add_argument(
        "--drawer",
        action="store_true",
        help="train the drawer stage for every variant, as the demo does (default: judge "
        "reconstruction with stage 2-2's own latent decoder, ~25 %% cheaper)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny check: control + no_rope, the first seed, scale 0.01, batch 4, 12 questions",
    )
    parser.add_argument("--dry-run", action="store_true", help="check the variants and print them; train nothing")
    parser.add_argument(
        "--report",
        action="store_true",
        help="train nothing: rebuild summary.json from the label's records and print the docs/research.md table",
    )
    args = parser.parse_args(argv)

    if args.smoke:
        args.scale, args.seeds, args.only = 0.01, args.seeds[:1], ["control", "no_rope"]
        args.set = ["train.batch_size=4", "train.eval_samples=4", *args.set]
        args.num_images, args.num_photos = min(args.num_images, 4), min(args.num_photos, 2)
        args.num_questions = min(args.num_questions or 12, 12)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the trainer takes a GPU whenever it sees one
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    variants = {} if args.no_defaults else default_variants()
    if args.axes is not None:
        variants = {k: v for k, v in variants.items() if v.axis in (*args.axes, "control")}
    if CONTROL not in variants:
        variants = {CONTROL: default_variants()[CONTROL], **variants}
    for tokens in args.variant:
        name, rest = tokens[0], tokens[1:]
        if name in variants:
            parser.error(f"--variant {name}: the name is taken")
        try:
            variants[name] = parse_variant(name, rest)
        except ValueError as e:
            parser.error(str(e))
    if args.set:
        try:
            common = parse_variant("--set", args.set)
        except ValueError as e:
            parser.error(str(e))
        if common.skip or common.until != "drawer":
            parser.error("--set: skip= / until= belong to a variant")
        for v in variants.values():
            v.overrides = [*common.overrides, *v.overrides]
    if args.only is not None:
        unknown = sorted(set(args.only) - set(variants))
        if unknown:
            parser.error(f"--only: unknown variants {unknown} (known: {', '.join(variants)})")
        variants = {k: v for k, v in variants.items() if k in args.only}
    if not args.drawer:
        for v in variants.values():
            # A variant whose stage 2-2 trains no latent decoder (loss.recon=0) keeps its drawer.
            no_decoder = any(
                "stage2_2" in stages and kv.replace(" ", "") in ("loss.recon=0", "loss.recon=0.0")
                for stages, kv in v.overrides
            )
            if v.until == "drawer" and not no_decoder:
                v.until = "stage2_2"
    for v in variants.values():
        try:
            check_variant(v)
        except ValueError as e:
            parser.error(str(e))
    import torch  # already loaded by the variant checks

    label = _label(args)
    results = Path(args.results or RESULTS / label)
    if args.report:
        if not any(results.glob("*-seed*.json")):
            parser.error(f"--report: no records in {results}")
        summary = write_summary(results, label, args.scale, torch.device(args.device), None)
        print(markdown_table(summary, list(default_variants())))
        return summary
    if args.dry_run:
        for v in variants.values():
            print(f"{v.name:12s} {v.axis:10s} {' '.join(v.spec()) or '(demo recipes)'}   stages: {' '.join(v.chain())}")
        return {"variants": {k: v.spec() for k, v in variants.items()}}

    from bench.common import write_record
    from viq.demo.run import prepare_demo

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU visible")
    device = torch.device(args.device)
    work = Path(args.work or Path("runs") / "ablations" / label).resolve()
    results.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    started = time.perf_counter()
    for seed in args.seeds:
        seed_dir = work / f"seed{seed}"
        prep = prepare_demo(seed_dir, scale=args.scale, seed=seed)
        for v in variants.values():
            t = time.perf_counter()
            chain = train_chain(v, seed_dir, scale=args.scale, seed=seed, device=args.device)
            train_wall = time.perf_counter() - t
            t = time.perf_counter()
            run_out = work / "eval" / f"{v.name}-seed{seed}"
            ev = evaluate_run(
                v,
                chain,
                seed_dir,
                run_out,
                seed=seed,
                device=device,
                num_images=args.num_images,
                num_photos=args.num_photos,
                num_questions=args.num_questions,
            )
            ev["qa"]["real_minus_blank"] = ev["qa"]["real"] - ev["qa"]["blank"]
            last = Path(chain[-1]["dir"]) / "final" / "config.json"
            record = {
                "variant": v.name,
                "axis": v.axis,
                "description": v.description,
                "spec": v.spec(),
                "seed": seed,
                "scale": args.scale,
                "smoke": args.smoke,
                "num_questions": ev["qa"]["n"],
                **ev,
                "train_s": sum(e["train_s"] or 0.0 for e in chain),
                "stage2_s_per_step": _seconds_per_step(chain, ("stage2_1", "stage2_2")),
                "stages": chain,
                "prepare_s": prep,
                "wall_s": {"train": train_wall, "eval": time.perf_counter() - t},
                "model_config": json.loads(last.read_text()) if last.is_file() else None,
            }
            path = write_record("ablations", device, record, out=str(results / f"{v.name}-seed{seed}.json"))
            log.info(
                "%s seed %d: QA real %.3f blank %.3f -> %s", v.name, seed, ev["qa"]["real"], ev["qa"]["blank"], path
            )
            records.append(record)
            write_summary(results, label, args.scale, device, started)  # a stopped sweep keeps one
    summary = write_summary(results, label, args.scale, device, started)
    print_table(summary)
    return summary


if __name__ == "__main__":
    main()
