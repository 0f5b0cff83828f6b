"""Where a small model's training step goes, and what the trainer's overhead costs: the demo's stage-1 step.

A demo stage-1 step (``recipes/demo/stage1.yaml``: the SigLIP stand-in's trunk at native resolution, MAP
pool + self-distillation against the frozen teacher, latent decoder + VAE-latent loss, projector, a
2-layer LLM over packed rows, AdamW) on the demo's own data, measured phase by phase:

* ``data``: reading and collating the micro-batch (PNG decode, preprocessing, chat tokenisation);
* ``forward`` (the model and the loss combination), ``backward``, ``optimizer`` (clipping, AdamW step,
  zero_grad, LR schedule): what :func:`viq.train.engine.train_step` does, timed around its parts;
* ``kernels``: the share of forward + backward + optimizer time spent inside ATen operators (torch
  profiler, self time); the rest is Python and dispatch overhead;
* FLOPs of one step (``torch.utils.flop_counter``) over its time: the achieved rate, beside the machine's
  rate for one large fp32 (and bf16) matrix product measured in the same run with the same threads.

``--baseline REV`` measures the same step (same recipe, data, init weights, batch) with the viq of git
revision ``REV`` too, in a subprocess on a temporary ``git worktree``: before / after in one run, on
one machine. ``--compile`` adds the current tree with ``torch.compile`` on the trunk's blocks and the
LLM (compile time reported apart). Needs a demo folder (``viq demo -o RUN``; only its data/, llm/ and
init/ are read). One record under ``bench/results/``.

    python -m bench.demo_step viq-demo
    python -m bench.demo_step viq-demo --baseline 9bdd24f --compile --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def matmul_rate(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of one (n x n) @ (n x n) product, best of ``repeats``."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def measure(run: Path, batch_size: int, steps: int, compile_: bool = False) -> dict:
    """Phase times (median over ``steps`` measured steps, after 3 warm-up steps) of demo stage-1 steps with
    the installed / importable viq. Uses only APIs that older viq revisions have too."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    import viq
    from viq.demo.run import stage_overrides
    from viq.train import engine
    from viq.train.build import build_model
    from viq.train.config import load_recipe
    from viq.train.data import BatchStream, Collator, build_dataset, max_pixels_at
    from viq.train.optim import build_optimizer, build_scheduler
    from viq.train.parallel import Dist

    recipe = REPO / "src" / "viq" / "recipes" / "demo" / "stage1.yaml"  # this tree's recipe, for every revision
    out = Path(tempfile.mkdtemp(prefix="demo-step-"))
    overrides = stage_overrides("stage1", run, 1.0, 0, 1000) + [
        f"train.output_dir={out}",
        f"train.batch_size={batch_size}",
        "train.progress=false",
    ]
    cfg = load_recipe(recipe, overrides)
    torch.manual_seed(0)
    pixels = max_pixels_at(cfg, 0)
    dataset = build_dataset(cfg.data.train, cfg, pixels)
    model, tokenizer = build_model(cfg, device=torch.device("cpu"))
    engine.prepare_model(model, cfg)
    compile_s = None
    if compile_:
        t = time.perf_counter()
        for block in model.encoder.blocks:
            block.compile(dynamic=True)
        model.llm.compile(dynamic=True)
        compile_s = time.perf_counter() - t  # lazy: the first steps compile; measured below
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    collator = Collator(
        tokenizer,
        cfg.llm.max_length,
        image_tokens=model.projector.num_tokens,
        patch_size=model.config.encoder.patch_size,
    )
    stream = BatchStream(cfg, Dist(), collator, 0, built=(pixels, dataset))
    weights = engine.loss_weights(cfg)

    def step(batch) -> dict[str, float]:
        times = {}
        t = time.perf_counter()
        out_ = model(batch)
        loss, _ = engine.combine_losses(out_, weights, max(1.0, batch.num_supervised_tokens), batch.num_images)
        times["forward"] = time.perf_counter() - t
        t = time.perf_counter()
        loss.backward()
        times["backward"] = time.perf_counter() - t
        t = time.perf_counter()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        times["optimizer"] = time.perf_counter() - t
        return times

    warm_start = time.perf_counter()
    for _ in range(3):
        step(stream.next(0))
    warmup_s = time.perf_counter() - warm_start
    rows = []
    for _ in range(steps):
        t = time.perf_counter()
        batch = stream.next(0)
        data_s = time.perf_counter() - t
        times = step(batch)
        times["data"] = data_s
        rows.append(times)
    phases = {k: statistics.median(r[k] for r in rows) for k in ("data", "forward", "backward", "optimizer")}
    train_s = phases["forward"] + phases["backward"] + phases["optimizer"]
    batch = stream.next(0)
    with FlopCounterMode(display=False) as counter:
        step(batch)
    flops = counter.get_total_flops()
    batches = [stream.next(0) for _ in range(3)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for b in batches:
            step(b)
        profiled_s = time.perf_counter() - t
    kernel_s = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith("aten::")) / 1e6
    return {
        "viq": str(Path(viq.__file__).resolve().parent),
        "batch_size": batch_size,
        "steps_measured": steps,
        "phases_s": phases,
        "step_s": train_s + phases["data"],
        "samples_per_s": batch_size / (train_s + phases["data"]),
        "steps_per_s": 1 / (train_s + phases["data"]),
        "gflop_per_step": flops / 1e9,
        "achieved_gflop_s": flops / 1e9 / train_s,
        # The profiler adds overhead of its own: the kernel share is measured inside the profiled steps.
        "kernel_share": kernel_s / profiled_s,
        "warmup_s": warmup_s,
        "compile": compile_,
        "compile_call_s": compile_s,
    }


def _baseline(rev: str, run: Path, args) -> dict:
    """:func:`measure` with viq at git revision ``rev`` (a temporary worktree), in a subprocess."""
    with tempfile.TemporaryDirectory(prefix="viq-baseline-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev], check=True, capture_output=True
        )
        try:
            result = Path(tmp) / "result.json"
            env = {**os.environ, "PYTHONPATH": f"{tree / 'src'}{os.pathsep}{REPO}"}
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.demo_step",
                    str(run),
                    "--measure-only",
                    str(result),
                    "--batch-size",
                    str(args.batch_size),
                    "--steps",
                    str(args.steps),
                ],
                check=True,
                env=env,
                cwd=REPO,
            )
            record = json.loads(result.read_text())
            record["revision"] = subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", rev], check=True, capture_output=True, text=True
            ).stdout.strip()
            return record
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False, capture_output=True
            )


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a demo folder (viq demo -o RUN): data/, llm/, init/")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per step (the demo's stage 1: 64)")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per variant (after 3 warm-up steps)")
    parser.add_argument("--baseline", metavar="REV", help="also measure viq at this git revision")
    parser.add_argument("--compile", action="store_true", help="also measure with torch.compile")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--measure-only", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="record path (default bench/results/demo_step-...json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = args.run.resolve()
    if args.measure_only:
        Path(args.measure_only).write_text(json.dumps(measure(run, args.batch_size, args.steps)))
        return None

    from bench.common import write_record

    record: dict = {
        "run": str(run),
        "threads": torch.get_num_threads(),
        "matmul_gflop_s": {"float32": matmul_rate(torch.float32), "bfloat16": matmul_rate(torch.bfloat16)},
        "variants": {},
    }
    if args.baseline:
        record["variants"]["baseline"] = _baseline(args.baseline, run, args)
    record["variants"]["current"] = measure(run, args.batch_size, args.steps)
    if args.compile:
        record["variants"]["compiled"] = measure(run, args.batch_size, args.steps, compile_=True)
    peak = record["matmul_gflop_s"]["float32"]
    print(f"matmul: fp32 {peak:.0f} GFLOP/s, bf16 {record['matmul_gflop_s']['bfloat16']:.0f} GFLOP/s")
    for name, v in record["variants"].items():
        p = v["phases_s"]
        print(
            f"{name:9s} {v['samples_per_s']:6.0f} samples/s  step {1000 * v['step_s']:6.1f} ms = data {1000 * p['data']:.1f}"
            f" + fwd {1000 * p['forward']:.1f} + bwd {1000 * p['backward']:.1f} + opt {1000 * p['optimizer']:.1f};"
            f" {v['gflop_per_step']:.1f} GFLOP/step, {v['achieved_gflop_s']:.0f} GFLOP/s "
            f"({100 * v['achieved_gflop_s'] / peak:.0f} % of the matmul rate), kernels {100 * v['kernel_share']:.0f} %"
        )
    if "baseline" in record["variants"]:
        record["speedup"] = (
            record["variants"]["current"]["samples_per_s"] / record["variants"]["baseline"]["samples_per_s"]
        )
        print(f"current / baseline: {record['speedup']:.2f}x samples/s")
    path = write_record("demo_step", torch.device("cpu"), record, out=args.out)
    print(path)
    return record


if __name__ == "__main__":
    main()
