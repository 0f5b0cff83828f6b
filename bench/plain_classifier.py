"""What a plain image classifier learns from the demo's images in the demo's time: the reference beside
which the demo's QA accuracy (an LLM reading FSQ codes) is judged, and the evidence for what the demo's
budget allows on each task (issue 24: "if digits stay out of reach, show by how much").

Two direct classifiers, trained on the demo's training images with the answers as labels (one softmax
head per task over its answers), evaluated on the demo's held-out questions, accuracy per task recorded
each time the training clock passes a budget (``--budgets``, seconds):

* ``cnn``: a small convolutional net (four 3x3 conv layers with max pooling, the 8x8 map flattened into
  one hidden layer, so it keeps position), images zero-padded to 64 x 64;
* ``siglip``: the demo's SigLIP stand-in (:mod:`viq.demo.tiny_siglip`, the encoder stage 1 starts
  from), answering by the nearest answer text, trained exactly as the demo trains it (batch 128).

Both see the same images in the same order of magnitude of time as the demo's stages; the clock counts
training steps only (data are decoded once, before the clock starts). One record per run under
``bench/results/`` (command, device, date, per budget and task: accuracy, n, Wilson interval).

    python -m bench.plain_classifier viq-demo
    python -m bench.plain_classifier viq-demo --budgets 15 30 60 120 240 480 --models cnn
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import write_record


class SmallCNN(nn.Module):
    """(B, 3, 64, 64) -> per task logits over its answers."""

    def __init__(self, answers: dict[str, tuple[str, ...]], width: int = 32) -> None:
        super().__init__()
        chans = (3, width, 2 * width, 4 * width, 4 * width)
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), nn.ReLU()]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(chans[-1] * 8 * 8, 256), nn.ReLU())
        self.heads = nn.ModuleDict({task: nn.Linear(256, len(a)) for task, a in answers.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.features(x))


def _load(data: Path, split: str, answers: dict[str, tuple[str, ...]]):
    from viq.demo.synthetic import load_split
    from viq.formats.image import PreprocessConfig, preprocess

    records = [r for r in load_split(data, split) if r.get("task") in answers]
    pre = PreprocessConfig(max_pixels=64 * 64)
    images = [preprocess(data / r["image"], pre).pixels for r in records]
    labels = torch.tensor([answers[r["task"]].index(r["answer"]) for r in records])
    tasks = [r["task"] for r in records]
    return records, images, labels, tasks


def _padded(images: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([F.pad(x, (0, 64 - x.shape[2], 0, 64 - x.shape[1])) for x in images])


def _per_task(tasks: list[str], correct: list[bool]) -> dict[str, dict]:
    from viq.eval.intervals import wilson_interval

    out = {}
    for task in sorted(set(tasks)):
        hits = [c for t, c in zip(tasks, correct) if t == task]
        out[task] = {"n": len(hits), "accuracy": sum(hits) / len(hits), "ci95": wilson_interval(sum(hits), len(hits))}
    return out


def run_cnn(data: Path, answers, budgets: list[float], seed: int) -> list[dict]:
    _, train_x, train_y, train_t = _load(data, "train", answers)
    _, test_x, test_y, test_t = _load(data, "test", answers)
    x, xt = _padded(train_x), _padded(test_x)
    task_names = list(answers)
    tid, tid_test = torch.tensor([task_names.index(t) for t in train_t]), [task_names.index(t) for t in test_t]
    torch.manual_seed(seed)
    model = SmallCNN(answers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    g = torch.Generator().manual_seed(seed)
    rows, clock, step, pending = [], 0.0, 0, sorted(budgets)
    while pending:
        t = time.perf_counter()
        idx = torch.randint(len(x), (128,), generator=g)
        h = model(x[idx])
        loss = sum(
            F.cross_entropy(model.heads[name](h[tid[idx] == k]), train_y[idx][tid[idx] == k], reduction="sum")
            for k, name in enumerate(task_names)
            if (tid[idx] == k).any()
        ) / len(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        clock += time.perf_counter() - t
        step += 1
        if clock >= pending[0]:
            pending.pop(0)
            model.eval()
            with torch.no_grad():
                h = model(xt)
                pred = [int(model.heads[task_names[k]](h[i : i + 1]).argmax()) for i, k in enumerate(tid_test)]
            model.train()
            rows.append(
                {
                    "seconds": clock,
                    "steps": step,
                    "per_task": _per_task(test_t, [p == int(y) for p, y in zip(pred, test_y)]),
                }
            )
            print(
                f"cnn {clock:6.1f} s ({step} steps): "
                + ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in rows[-1]["per_task"].items())
            )
    return rows


def run_siglip(data: Path, answers, budgets: list[float], seed: int, llm: Path) -> list[dict]:
    from transformers import AutoTokenizer

    from viq.demo.run import SIGLIP_BATCH
    from viq.demo.tiny_siglip import contrastive_text, train_tiny_siglip
    from viq.model.config import get_preset

    records, images, _, _ = _load(data, "train", answers)
    test, test_images, _, test_tasks = _load(data, "test", answers)
    tokenizer = AutoTokenizer.from_pretrained(llm)
    tokenize = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    texts = [contrastive_text(r["question"], r["answer"]) for r in records]
    rows = []
    # The stand-in has a step schedule (warm-up, cosine): each budget is its own run, its steps chosen from
    # the measured step time, so every point is a complete schedule of about that length.
    probe = train_tiny_siglip(
        images,
        texts,
        tokenize,
        get_preset("viq-demo").encoder,
        vocab_size=len(tokenizer),
        steps=20,
        batch_size=SIGLIP_BATCH,
        seed=seed,
        progress=False,
    )
    step_time = probe.seconds / 20
    for budget in sorted(budgets):
        steps = max(20, round(budget / step_time))
        result = train_tiny_siglip(
            images,
            texts,
            tokenize,
            get_preset("viq-demo").encoder,
            vocab_size=len(tokenizer),
            steps=steps,
            batch_size=SIGLIP_BATCH,
            seed=seed,
            progress=False,
        )
        cands = [[torch.tensor(tokenize(contrastive_text(r["question"], a))) for a in answers[r["task"]]] for r in test]
        picks = result.zero_shot(test_images, cands)
        correct = [answers[r["task"]][p] == r["answer"] for r, p in zip(test, picks)]
        rows.append({"seconds": result.seconds, "steps": steps, "per_task": _per_task(test_tasks, correct)})
        print(
            f"siglip {result.seconds:6.1f} s ({steps} steps): "
            + ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in rows[-1]["per_task"].items())
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a demo output folder (viq demo -o RUN): its data/ and llm/")
    parser.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=[15, 30, 60, 120, 240],
        help="training seconds at which to evaluate (default 15 30 60 120 240)",
    )
    parser.add_argument("--models", nargs="+", choices=("cnn", "siglip"), default=["cnn", "siglip"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="record path (default bench/results/plain_classifier-...json)")
    args = parser.parse_args(argv)

    from viq.demo.synthetic.simple import SIMPLE_ANSWERS

    torch.set_num_threads(min(2, torch.get_num_threads()))
    answers = {task: tuple(a) for task, a in SIMPLE_ANSWERS.items()}
    record = {"run": str(args.run), "budgets_s": args.budgets, "seed": args.seed, "models": {}}
    if "cnn" in args.models:
        record["models"]["cnn"] = run_cnn(args.run / "data", answers, args.budgets, args.seed)
    if "siglip" in args.models:
        record["models"]["siglip"] = run_siglip(args.run / "data", answers, args.budgets, args.seed, args.run / "llm")
    path = write_record("plain_classifier", torch.device("cpu"), record, out=args.out)
    print(path)
    return record


if __name__ == "__main__":
    main()
