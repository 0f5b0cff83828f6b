"""``viq demo``: the whole ViQ recipe, end to end, on a CPU, with nothing downloaded.

1. a synthetic multimodal QA set (:mod:`viq.demo.synthetic`),
2. a tiny Qwen2 LLM and a BPE tokenizer trained on that set's text (:func:`viq.demo.tiny_llm.build_tiny_llm`),
3. a small pixel VAE fitted to the images (the Qwen-Image VAE cannot be downloaded here;
   :mod:`viq.demo.pixel_codec`), stored with a fresh ``viq-demo`` model as the starting point,
4. stage 1 -> stage 2-1 -> stage 2-2 -> drawer with the recipes in ``recipes/demo/``,
5. held-out images and real photographs encoded and reconstructed by the final model, QA answered,
   and an HTML report (``report.html``): input vs reconstruction, loss curves, metrics.

With the default scale it takes about five minutes on 2 CPU cores (4 min 50 s measured). The models are tiny and briefly
trained: the report shows that every part runs and learns, not paper-level quality.
"""

from __future__ import annotations

import json
import logging
import time
from importlib import resources
from pathlib import Path

import torch

from viq.train.stages import get_stage

log = logging.getLogger(__name__)

__all__ = ["run_demo", "DEMO_STAGES"]

#: The stages the demo trains, in order (records of viq.train.stages).
DEMO_STAGES = ("stage1", "stage2_1", "stage2_2", "drawer")


def _recipe_path(stage: str) -> Path:
    return Path(str(resources.files("viq") / "recipes" / "demo" / f"{stage}.yaml"))


def _stage_overrides(stage: str, out: Path, scale: float, seed: int, max_steps: int) -> list[str]:
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
    if spec.llm:
        overrides.append(f"llm.path={out / 'llm'}")
    return overrides


def run_demo(out: Path, *, scale: float = 1.0, seed: int = 0) -> Path:
    """Run the demo into ``out`` and return the path of the HTML report. Steps already done (their
    outputs exist) are skipped, so an interrupted demo can be re-run."""
    from viq.model.config import get_preset
    from viq.demo.synthetic import generate, load_split
    from viq.demo.tiny_llm import build_tiny_llm
    from viq.mllm.chat import IMAGE_TOKEN
    from viq.model.viq import ViQModel
    from viq.train.config import load_recipe
    from viq.train.engine import train

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    data = out / "data"
    if not (data / "meta.json").is_file():
        log.info("demo 1/6: synthetic QA set -> %s", data)
        generate(data, num_train=max(16, round(800 * scale)), num_val=48, num_test=48, seed=seed,
                 min_side=48, max_side=128, overwrite=True)
    timings["data"] = time.perf_counter() - t

    t = time.perf_counter()
    if not (out / "llm" / "config.json").is_file():
        log.info("demo 2/6: tiny LLM + tokenizer trained on the set's text -> %s", out / "llm")
        corpus = []
        for split in ("train", "val"):
            for record in load_split(data, split):
                corpus.extend(turn["value"].replace(IMAGE_TOKEN, "") for turn in record["conversations"])
        build_tiny_llm(out / "llm", corpus, vocab_size=1024, hidden_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, intermediate_size=256, seed=seed)
    timings["llm"] = time.perf_counter() - t

    t = time.perf_counter()
    vae_history: list[float] = []
    if not (out / "init" / "model.safetensors").is_file():
        log.info("demo 3/6: pixel VAE fitted to the training images, fresh viq-demo model -> %s", out / "init")
        from viq.formats.image import PreprocessConfig, preprocess
        from viq.demo.pixel_codec import train_pixel_vae

        config = get_preset("viq-demo")
        pre = PreprocessConfig(max_pixels=96 * 96)
        files = sorted((data / "images" / "train").glob("*.png"))
        images = [preprocess(f, pre).pixels for f in files]
        vae = train_pixel_vae(images, config.vae, steps=max(10, round(300 * scale)), seed=seed)
        vae_history = vae.history
        model = ViQModel.from_config(config, seed=seed)
        model.vae.load_state_dict(vae.state_dict())
        model.save_pretrained(out / "init")
        (out / "init" / "vae_history.json").write_text(json.dumps(vae_history))
    timings["pixel_vae"] = time.perf_counter() - t

    for stage in DEMO_STAGES:
        final = out / "runs" / stage / "final"
        t = time.perf_counter()
        if not (final / "stage.json").is_file():
            log.info("demo 4/6: %s", stage)
            cfg = load_recipe(_recipe_path(stage), [])
            cfg = load_recipe(_recipe_path(stage), _stage_overrides(stage, out, scale, seed, cfg.train.max_steps))
            train(cfg)
        timings[stage] = time.perf_counter() - t

    log.info("demo 5/6: encode + reconstruct held-out images and photographs, answer held-out questions")
    t = time.perf_counter()
    results = evaluate_final(out, seed=seed)
    timings["evaluation"] = time.perf_counter() - t
    results["timings_s"] = timings
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    from viq.demo.report import write_report

    report = write_report(out, results)
    log.info("demo 6/6: report -> %s", report)
    return report


def evaluate_final(out: Path, *, seed: int = 0, num_images: int = 8, num_photos: int = 6) -> dict:
    """Encode/reconstruct held-out synthetic images and real photos with the final model; answer
    the held-out questions with the stage 2-2 LLM."""
    import viq
    from viq.demo.photos import list_photos, load_photo
    from viq.demo.synthetic import load_split
    from viq.formats.image import PreprocessConfig, preprocess, to_pil, to_pixels
    from viq.train.build import build_model
    from viq.train.config import load_recipe
    from viq.train.evaluate import evaluate, psnr

    final = out / "runs" / "drawer" / "final"
    model = viq.load(final)
    pre = PreprocessConfig(max_pixels=96 * 96)
    recon_dir = out / "reconstructions"
    recon_dir.mkdir(exist_ok=True)
    items = []
    test = [r for r in load_split(out / "data", "test") if "image" in r][:num_images]
    sources = [("test", r["id"], out / "data" / r["image"]) for r in test]
    sources += [("photo", p.file_stem, p) for p in list_photos()[:num_photos]]
    for kind, name, src in sources:
        image = load_photo(src) if kind == "photo" else str(src)
        prepared = preprocess(image, pre)
        codes = model.encode_pixels([prepared.pixels])[0]
        recon = model.reconstruct([codes])[0]
        target = prepared.pixels
        value = psnr(to_pixels(recon), target)
        in_path, out_path = recon_dir / f"{kind}-{name}-input.png", recon_dir / f"{kind}-{name}-recon.png"
        to_pil(target).save(in_path)
        recon.save(out_path)
        nbytes = len(codes.to_bytes())
        items.append({"kind": kind, "name": name, "input": str(in_path.relative_to(out)),
                      "recon": str(out_path.relative_to(out)), "psnr": value, "grid": list(codes.grid),
                      "codes": codes.num_codes, "bytes": nbytes,
                      "bpp": 8 * nbytes / (codes.image_size[0] * codes.image_size[1])})

    # QA on the held-out test split with the stage 2-2 model (its LLM and projector).
    cfg = load_recipe(_recipe_path("stage2_2"), _stage_overrides("stage2_2", out, 1.0, seed, 1) + [
        f"model.init=viq:{out / 'runs' / 'stage2_2' / 'final'}", f"data.val={out / 'data' / 'test.jsonl'}",
        "train.eval_samples=48", "model.config={}"])
    device = torch.device("cpu")
    qa_model, tokenizer = build_model(cfg, device=device)
    examples: list[dict] = []
    metrics = evaluate(qa_model, cfg, tokenizer, device, examples=examples)
    stages = {}
    for stage in DEMO_STAGES:
        path = out / "runs" / stage / "metrics.jsonl"
        if path.is_file():
            history = [json.loads(line) for line in path.read_text().splitlines()]
            val = [json.loads(line) for line in (out / "runs" / stage / "val.jsonl").read_text().splitlines()] \
                if (out / "runs" / stage / "val.jsonl").is_file() else []
            stages[stage] = {"history": history, "val": val[-1] if val else {}}
    vae_hist = out / "init" / "vae_history.json"
    return {"reconstructions": items, "qa": metrics, "qa_examples": examples[:16], "stages": stages,
            "vae_history": json.loads(vae_hist.read_text()) if vae_hist.is_file() else [],
            "model": {"config": model.config.to_dict(), "fingerprint": model.fingerprint()}}
