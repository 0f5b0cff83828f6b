"""The paper's pipeline at the published widths, from checkpoints in the published formats, command by command.

What ``tests/test_public_checkpoints.py`` runs in CI at small widths, here at the real ones (random
weights; 2 layers of each deep stack, so that it fits a CPU): SigLIP2-giant-opt vision widths (1536,
16 heads, MLP 6144) as a transformers ``Siglip2Model`` (NaFlex), Qwen2.5-0.5B widths (896, 14 / 2 heads,
MLP 4864, 151,936 embedding rows) with Qwen's ChatML tokenizer (eos ``<|endoftext|>``), a Qwen2.5-1.5B-
wide instruct LLM for the MLLM, and the Qwen-Image VAE at its published width (``base_dim`` 96) -- the LLM
and the VAE in a Hugging Face cache under their Hub ids. ``recipes/paper/*.yaml`` run through the
command line (``python -m viq``, one process per command) with only paths and step counts changed:

    stage1 -> stage2_1 -> stage2_2 -> drawer -> encode -> decode -> extract -> train-mllm -> eval-qa

Recorded per command: exit status, wall time, and the peak resident memory of the processes so far.

    python -m bench.public_pipeline                   # bench/results/public_pipeline-cpu-<time>.json
    python -m bench.public_pipeline --steps 1 --keep /tmp/pipeline
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import write_record
from viq.demo import public_checkpoints as pc

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "src" / "viq" / "recipes" / "paper"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2, help="training steps of each stage")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="viq-public-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    art = work / "downloads"
    corpus = ["What color is the square? " + " ".join(pc.COLOURS) + " a photo"] * 20
    naflex = pc.hf_siglip2_naflex(art / "siglip2-giant-opt-naflex", pc.GIANT_OPT)
    llm_a = pc.qwen2_llm(art / "Qwen2.5-0.5B", corpus, pc.QWEN25_05B, embedding_rows=151936)
    llm_b = pc.qwen2_llm(
        art / "Qwen2.5-1.5B-Instruct",
        corpus,
        pc.LLMWidths(hidden=1536, heads=12, kv_heads=2, intermediate=8960, layers=2),
        instruct=True,
        embedding_rows=151936,
        seed=1,
    )
    vae = pc.qwen_image_vae(art / "vae")
    cache = work / "hf-cache"
    pc.hub_cache_entry(cache, "Qwen/Qwen-Image", vae, subfolder="vae")
    pc.hub_cache_entry(cache, "Qwen/Qwen2.5-0.5B", llm_a)
    made = pc.colour_square_qa(work / "data", args.images)
    data, folder = made["jsonl"], made["folder"]
    build_s = time.perf_counter() - t0

    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    runs = work / "runs"
    common = [
        f"train.max_steps={args.steps}",
        "train.save_every=0",
        "train.precision=fp32",
        "train.progress=false",
        "train.parallel=ddp",
    ]
    on_data = [f"data.train={data}", f"data.image_root={data.parent}", "data.resolution_schedule=[]"]

    def train(recipe: str, out: str, *extra: str, command: str = "train") -> list[str]:
        return [command, "--config", str(RECIPES / f"{recipe}.yaml"), f"train.output_dir={runs / out}", *common, *extra]

    steps = [
        (
            "stage1",
            train(
                "stage1",
                "stage1",
                f"model.init=hf-siglip:{naflex}",
                *on_data,
                f"data.val={data}",
                f"train.eval_every={args.steps}",
                "train.eval_samples=2",
            ),
        ),
        ("stage2_1", train("stage2_1", "stage2_1", f"model.init=viq:{runs / 'stage1' / 'final'}", *on_data)),
        ("stage2_2", train("stage2_2", "stage2_2", f"model.init=viq:{runs / 'stage2_1' / 'final'}", *on_data)),
        ("drawer", train("drawer", "drawer", f"model.init=viq:{runs / 'stage2_2' / 'final'}", f"data.train={folder}")),
        ("encode", ["encode", str(runs / "drawer" / "final"), str(folder), "-o", str(work / "codes")]),
        ("decode", ["decode", str(runs / "drawer" / "final"), str(work / "codes"), "-o", str(work / "recon")]),
        ("extract", ["extract", str(runs / "drawer" / "final"), str(data), "-o", str(work / "codes.store")]),
        (
            "train-mllm",
            train(
                "mllm",
                "mllm",
                f"model.init=viq:{runs / 'stage2_2' / 'final'}",
                f"llm.path={llm_b}",
                *on_data,
                f"data.val={data}",
                f"data.codes={work / 'codes.store'}",
                "train.eval_every=0",
                "train.eval_samples=2",
                "llm.mode=dora",
                "llm.lora_r=64",
                "train.batch_size=1",
                "train.grad_accum=2",
                command="train-mllm",
            ),
        ),
        ("eval-qa", ["eval-qa", str(runs / "mllm"), str(data), "--baselines", "--json", str(work / "qa.json")]),
    ]
    results = []
    for name, cmd in steps:
        t = time.perf_counter()
        log = work / f"{name}.log"
        with open(log, "w") as f:
            rc = subprocess.run(
                [sys.executable, "-m", "viq", *cmd], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT
            ).returncode
        seconds = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # GiB (Linux: KiB)
        results.append({"step": name, "exit": rc, "seconds": seconds, "peak_rss_gib_so_far": peak})
        print(f"{name:10s} exit {rc}  {seconds:6.1f} s  peak RSS so far {peak:.1f} GiB", flush=True)
        if rc != 0:
            print(log.read_text()[-3000:], file=sys.stderr)
            break
    from safetensors.torch import load_file

    published = load_file(str(vae / "diffusion_pytorch_model.safetensors"))
    final = runs / "drawer" / "final" / "model.safetensors"
    same_vae = None
    if final.is_file():
        stored = {k[4:]: v for k, v in load_file(str(final)).items() if k.startswith("vae.")}
        same_vae = stored.keys() == published.keys() and all(torch.equal(stored[k], published[k]) for k in published)
    record = {
        "widths": {"vision": pc.GIANT_OPT.__dict__, "llm": pc.QWEN25_05B.__dict__, "vae_base_dim": 96},
        "steps_per_stage": args.steps,
        "images": args.images,
        "build_s": build_s,
        "results": results,
        "all_exit_0": len(results) == len(steps) and all(r["exit"] == 0 for r in results),
        "final_vae_equals_diffusers_weights": same_vae,
    }
    path = write_record("public_pipeline", torch.device("cpu"), record, args.out)
    print(path)
    return 0 if record["all_exit_0"] else 1


if __name__ == "__main__":
    sys.exit(main())
