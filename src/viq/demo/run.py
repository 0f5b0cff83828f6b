"""``viq demo``: the whole ViQ recipe, end to end, on a CPU, with nothing downloaded.

1. a synthetic multimodal QA set (:mod:`viq.demo.synthetic`; the mix: :data:`TASK_WEIGHTS`),
2. a tiny Qwen2 LLM and a BPE tokenizer trained on that set's text (:func:`viq.demo.tiny_llm.build_tiny_llm`),
3. a small pixel codec fitted to the images (the Qwen-Image VAE cannot be downloaded here;
   :mod:`viq.demo.pixel_codec`), stored with a fresh ``viq-demo`` model as the starting point,
4. stage 1 -> stage 2-1 -> stage 2-2 -> drawer with the recipes in ``recipes/demo/``,
5. the verdict (:mod:`viq.demo.evaluation`): held-out QA with real, blank and shuffled images and the
   majority answer, for the stage-1 and the final quantized model; reconstruction of held-out images
   and real photographs beside mean colour, bicubic at equal bits and the codec alone; code entropy;
   written to ``results.json`` and an HTML report (``report.html``).

The models are tiny and briefly trained; the report says what they do and do not learn.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from importlib import resources
from pathlib import Path
from typing import Any

import viq
from viq.demo.evaluation import code_summary, evaluate_qa_with_baselines, evaluate_reconstruction
from viq.demo.photos import list_photos, load_photo
from viq.demo.pixel_codec import train_pixel_codec
from viq.demo.report import write_report
from viq.demo.synthetic import generate, load_split
from viq.demo.synthetic.simple import SIMPLE_ANSWERS
from viq.demo.tiny_llm import build_tiny_llm
from viq.demo.tiny_siglip import contrastive_text, train_tiny_siglip
from viq.eval.intervals import wilson_interval
from viq.formats.image import PreprocessConfig, preprocess, to_pil, to_pixels
from viq.mllm.chat import DEFAULT_SYSTEM_PROMPT, IMAGE_TOKEN
from viq.model.config import get_preset
from viq.model.viq import ViQModel
from viq.train.config import load_recipe
from viq.train.engine import train
from viq.train.logger import METRICS_FILE, read_metrics
from viq.train.stages import get_stage

log = logging.getLogger(__name__)

__all__ = ["run_demo", "prepare_demo", "generate_demo_set", "DEMO_STAGES"]

#: The stages the demo trains, in order (records of viq.train.stages).
DEMO_STAGES = ("stage1", "stage2_1", "stage2_2", "drawer")

#: The training mix: the simple tasks (one fixed question, a one-word answer), weighted towards the ones
#: a tiny model learns last (shape, position, count). The harder tasks of ``viq synth`` (text, charts,
#: documents) are left out: no model this size reads them in minutes (0 % in every earlier demo), and their
#: long answers were most of the supervised tokens, so they drowned the others' gradient.
TASK_WEIGHTS = {"shape_color": 0.15, "where": 0.2, "shape": 0.2, "count_big": 0.2, "digit": 0.15, "color": 0.1}
NUM_TRAIN = 8000
#: Held-out questions: with TASK_WEIGHTS, at least 105 per task the report checks (intervals of about
#: +-9 points; a fresh-seed set of any size: viq synth + viq eval-qa --baselines).
NUM_TEST = 700
#: Area bound of demo images (96 x 96) when encoding: 36 patches at most.
DEMO_MAX_PIXELS = 96 * 96
#: The SigLIP stand-in's schedule (:mod:`viq.demo.tiny_siglip`).
SIGLIP_STEPS, SIGLIP_BATCH = 1000, 128
#: Training images the pixel codec is fitted to.
CODEC_IMAGES = 2000
#: Latent noise the pixel codec is trained under (:func:`viq.demo.pixel_codec.train_pixel_codec`): up to
#: 0.3 of each channel's spread. The drawer's latents miss the codec's by about a third of their variance;
#: a decoder that only ever saw exact latents turned each block's error into a visible grid.
CODEC_LATENT_NOISE = 0.3


def recipe_path(stage: str) -> Path:
    """The demo's recipe of ``stage`` (``viq/recipes/demo/<stage>.yaml``)."""
    return Path(str(resources.files("viq") / "recipes" / "demo" / f"{stage}.yaml"))


def stage_overrides(stage: str, out: Path, scale: float, seed: int, max_steps: int, warmup_steps: int = 0) -> list[str]:
    """The overrides that point a demo recipe at the demo folder ``out`` (data, init, LLM, output) and
    scale its steps (``max_steps``, and the recipe's ``warmup_steps`` of the code head when it has some)."""
    data, runs = out / "data", out / "runs"
    spec = get_stage(stage)
    init = out / "init" if spec.follows is None else runs / spec.follows / "final"
    overrides = [
        f"model.init=viq:{init}",
        f"data.train={data / 'images' / 'train' if spec.data == 'images' else data / 'train.jsonl'}",
        f"data.val={data / 'val.jsonl'}",
        f"train.output_dir={runs / stage}",
        f"train.max_steps={max(2, round(max_steps * scale))}",
        f"train.seed={seed}",
    ]
    if warmup_steps:
        overrides.append(f"model.head_warmup_steps={max(1, round(warmup_steps * scale))}")
    if spec.llm:
        overrides.append(f"llm.path={out / 'llm'}")
    return overrides


def generate_demo_set(out: Path, *, num_train: int, num_val: int, num_test: int, seed: int) -> dict:
    """The demo's synthetic set (:data:`TASK_WEIGHTS`, 48-64 px images, one question each, no text-only
    samples) into ``out``, replacing what is there; ``viq synth --demo`` makes fresh-seed sets with it."""

    return generate(
        out,
        num_train=num_train,
        num_val=num_val,
        num_test=num_test,
        seed=seed,
        tasks=tuple(TASK_WEIGHTS),
        task_weights=TASK_WEIGHTS,
        min_side=48,
        max_side=64,
        text_only_fraction=0.0,
        multi_turn_fraction=0.0,
        overwrite=True,
    )


def prepare_demo(
    out: Path,
    *,
    scale: float = 1.0,
    seed: int = 0,
    codec_noise: float = CODEC_LATENT_NOISE,
    codec_refine: int | None = None,
) -> dict[str, float]:
    """Steps 1-3 of the demo into ``out`` (``data/``, ``llm/``, ``init/``), each skipped when its output
    exists; returns their times. Everything the stages start from, shared by runs that differ only in
    their stage recipes (``bench/ablations.py``). ``codec_noise`` / ``codec_refine``: the pixel codec's
    training noise and pixel refinement width (None: the ``viq-demo`` preset's), for ``bench/demo_codec.py``."""

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    data = out / "data"
    if not (data / "meta.json").is_file():
        log.info("demo 1/7: synthetic QA set -> %s", data)
        generate_demo_set(
            data,
            num_train=max(16, round(NUM_TRAIN * scale)),
            num_val=48,
            num_test=max(24, round(NUM_TEST * min(1.0, scale))),
            seed=seed,
        )
    timings["data"] = time.perf_counter() - t

    t = time.perf_counter()
    if not (out / "llm" / "config.json").is_file():
        log.info("demo 2/7: tiny LLM + tokenizer trained on the set's text -> %s", out / "llm")
        corpus: list[str] = []
        for split in ("train", "val"):
            for record in load_split(data, split):
                corpus.extend(turn["value"].replace(IMAGE_TOKEN, "") for turn in record["conversations"])
        # The chat template's own words (role names, the system prompt) once per conversation, so that
        # they become whole tokens: otherwise they are a third of every training row, in pieces.
        corpus.extend(["system\n" + DEFAULT_SYSTEM_PROMPT, "user\n", "assistant\n"] * (len(corpus) // 2))
        build_tiny_llm(
            out / "llm",
            corpus,
            vocab_size=1024,
            hidden_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=256,
            seed=seed,
        )
    timings["llm"] = time.perf_counter() - t

    if not (out / "init" / "model.safetensors").is_file():
        timings.update(_make_init(out, data, scale, seed, codec_noise, codec_refine))
    return timings


def _make_init(
    out: Path, data: Path, scale: float, seed: int, codec_noise: float, codec_refine: int | None
) -> dict[str, float]:
    """Step 3: the models stage 1 starts from, written to ``out/init``: a fresh ``viq-demo`` model whose
    encoder is the SigLIP stand-in and whose VAE is the demo's pixel codec, with ``vae_history.json`` (the
    codec's loss per step) and ``siglip.json`` (the stand-in's loss per step, its training time and its
    zero-shot answers on the test split)."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    timings = {}
    config = get_preset("viq-demo")
    if codec_refine is not None:
        config.vae = dataclasses.replace(config.vae, pixel_refine_channels=codec_refine)
    pre = PreprocessConfig(max_pixels=DEMO_MAX_PIXELS)
    train = [r for r in load_split(data, "train") if "image" in r]
    # 8-bit, as decoded (3 bytes a pixel instead of 12): the exact values the pixels are normalised from.
    images = [np.asarray(to_pil(preprocess(data / r["image"], pre).pixels)) for r in train]

    t = time.perf_counter()
    log.info("demo 3/7: pixel codec fitted to the training images")
    # A quarter of the images is plenty for a codec of this size (and keeps its PCA's patch matrix small).
    vae = train_pixel_codec(
        [to_pixels(x) for x in images[:CODEC_IMAGES]],
        config.vae,
        steps=max(10, round(800 * scale)),
        latent_noise=codec_noise,
        seed=seed,
    )
    timings["pixel_codec"] = time.perf_counter() - t

    t = time.perf_counter()
    log.info("demo 4/7: SigLIP stand-in (the encoder stage 1 starts from and distils towards)")
    tokenizer = AutoTokenizer.from_pretrained(out / "llm")
    tokenize = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    siglip = train_tiny_siglip(
        images,
        [contrastive_text(r["question"], r["answer"]) for r in train],
        tokenize,
        config.encoder,
        vocab_size=len(tokenizer),
        steps=max(10, round(SIGLIP_STEPS * scale)),
        batch_size=SIGLIP_BATCH,
        seed=seed,
    )
    test = [r for r in load_split(data, "test") if r.get("task") in SIMPLE_ANSWERS]
    picks = siglip.zero_shot(
        [preprocess(data / r["image"], pre).pixels for r in test],
        [[torch.tensor(tokenize(contrastive_text(r["question"], a))) for a in SIMPLE_ANSWERS[r["task"]]] for r in test],
    )
    zero_shot: dict[str, list[bool]] = {}
    for r, pick in zip(test, picks):
        zero_shot.setdefault(r["task"], []).append(SIMPLE_ANSWERS[r["task"]][pick] == r["answer"])
    timings["siglip"] = time.perf_counter() - t

    model = ViQModel.from_config(config, seed=seed)
    model.vae.load_state_dict(vae.state_dict())
    model.encoder.load_state_dict(siglip.model.image.state_dict())
    model.save_pretrained(out / "init")
    (out / "init" / "vae_history.json").write_text(json.dumps(vae.history))
    (out / "init" / "siglip.json").write_text(
        json.dumps(
            {
                "history": siglip.history,
                "seconds": siglip.seconds,
                "steps": len(siglip.history),
                "zero_shot": {
                    task: {"n": len(hits), "correct": int(sum(hits))} for task, hits in sorted(zero_shot.items())
                },
            }
        )
    )
    return timings


def run_demo(
    out: Path,
    *,
    scale: float = 1.0,
    seed: int = 0,
    codec_noise: float = CODEC_LATENT_NOISE,
    codec_refine: int | None = None,
) -> Path:
    """Run the demo into ``out`` and return the path of the HTML report. Steps already done (their
    outputs exist) are skipped, so an interrupted demo can be re-run. ``codec_*``: as in :func:`prepare_demo`."""

    started = time.perf_counter()
    out = Path(out).resolve()
    timings = prepare_demo(out, scale=scale, seed=seed, codec_noise=codec_noise, codec_refine=codec_refine)

    for stage in DEMO_STAGES:
        final = out / "runs" / stage / "final"
        t = time.perf_counter()
        if not (final / "stage.json").is_file():
            log.info("demo 5/7: %s", stage)
            cfg = load_recipe(recipe_path(stage), [])
            steps, warmup = cfg.train.max_steps, cfg.model.head_warmup_steps
            cfg = load_recipe(recipe_path(stage), stage_overrides(stage, out, scale, seed, steps, warmup))
            train(cfg, resume=True)  # a demo killed in this stage continues from its checkpoint
        timings[stage] = time.perf_counter() - t

    log.info("demo 6/7: encode + reconstruct held-out images and photographs, answer held-out questions")
    t = time.perf_counter()
    results = evaluate_final(out, seed=seed)
    timings["evaluation"] = time.perf_counter() - t
    results["timings_s"] = timings
    results["time_s"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_json_default))

    report = write_report(out, results)
    log.info("demo 7/7: report -> %s", report)
    return report


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def direct_classifier(path: Path) -> dict | None:
    """The SigLIP stand-in used directly as a classifier (``siglip.json`` of the demo's init): per task its
    zero-shot accuracy on the test split with a Wilson interval, and its training seconds and steps; what
    a model trained straight on the images, with the answers as labels, reads in that time."""

    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return {
        "seconds": record["seconds"],
        "steps": record["steps"],
        "per_task": {
            task: {"n": v["n"], "accuracy": v["correct"] / v["n"], "ci95": wilson_interval(v["correct"], v["n"])}
            for task, v in record["zero_shot"].items()
        },
    }


def evaluate_final(out: Path, *, seed: int = 0, num_images: int = 32, num_photos: int = 8) -> dict:
    """The demo's verdict (keys in ``results.json``): ``qa.stage1`` / ``qa.final`` (real, blank,
    shuffled images and the majority answer), ``recon.synthetic`` / ``recon.photos`` (beside mean
    colour, bicubic at equal bits and the codec alone), ``codes`` (entropy beside log2 K), plus the
    stage histories and the loss jump at the first stage 2-2 step."""

    runs, data = out / "runs", out / "data"
    model = viq.load(runs / "drawer" / "final")
    test = [r for r in load_split(data, "test") if "image" in r]
    synthetic = [(Path(r["image"]).stem, str(data / r["image"])) for r in test[:num_images]]
    photos = [(p.file_stem, load_photo(p)) for p in list_photos()[:num_photos]]
    recon_dir = out / "reconstructions"
    recon_syn, items_syn, hist = evaluate_reconstruction(
        model, synthetic, recon_dir, max_pixels=DEMO_MAX_PIXELS, kind="test"
    )
    recon_photo, items_photo, hist_photo = evaluate_reconstruction(
        model, photos, recon_dir, max_pixels=DEMO_MAX_PIXELS, kind="photo"
    )
    train_records = load_split(data, "train")
    qa = {
        name: evaluate_qa_with_baselines(runs / stage / "final", train_records, test, data, seed=seed)
        for name, stage in (("stage1", "stage1"), ("final", "stage2_2"))
    }
    stages: dict[str, dict[str, Any]] = {}
    for stage in DEMO_STAGES:
        if (runs / stage / METRICS_FILE).is_file():
            history = read_metrics(runs / stage, "train")
            val = read_metrics(runs / stage, "eval")
            stages[stage] = {"history": history, "val": val[-1] if val else {}}
    handover = {}
    if "stage2_1" in stages and "stage2_2" in stages:
        last, first = stages["stage2_1"]["history"][-1], stages["stage2_2"]["history"][0]
        handover = {k: {"stage2_1_last": last.get(k), "stage2_2_first": first.get(k)} for k in ("distill", "recon")}
    codec_hist = out / "init" / "vae_history.json"
    return {
        "qa": qa,
        "direct_classifier": direct_classifier(out / "init" / "siglip.json"),
        "recon": {"synthetic": recon_syn, "photos": recon_photo},
        "codes": code_summary(hist + hist_photo),
        "reconstructions": items_syn + items_photo,
        "stages": stages,
        "handover_2_1_to_2_2": handover,
        "vae_history": json.loads(codec_hist.read_text()) if codec_hist.is_file() else [],
        "model": {"config": model.config.to_dict(), "fingerprint": model.fingerprint()},
    }
