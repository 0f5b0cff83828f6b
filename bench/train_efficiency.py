"""MLLM training with an encoder in the loop (online) vs on stored codes (offline): the paper's speed-up.

Same LLM, same samples, same packed sequence length, two ways, in one run:

* ``online``: a SigLIP2-g-shaped continuous encoder (1536 wide, 40 deep, patch 16), trainable as
  continuous baselines are, + MM projector + LLM (``TrainModel`` stage1 path, distillation off).
* ``offline``: stored codes -> ViQ embedder (frozen) -> projector -> LLM (``TrainModel`` stage mllm).

Each micro-batch is one packed row of ``--seq-len`` tokens filled with conversations of one image
(``--image-size`` square) and random text. Reported: forward time and full training-step time
(forward + backward + AdamW), and the time reduction ``1 - offline / online`` in %.

    python -m bench.train_efficiency                                  # CPU, tiny shapes
    python -m bench.train_efficiency --device cuda --llm 0.5b 1.5b 3b 7b --seq-len 4096 16384

The paper's reductions (4K / 16K): forward 0.5B 71/79 %, 1.5B 69/77 %, 3B 62/73 %, 7B 47/65 %;
full step 0.5B 50/70 %, 1.5B 46/63 %, 3B 36/54 %, 7B 23/42 %.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench.common import best_time, write_record
from viq.formats.codes import Codes
from viq.mllm.chat import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from viq.mllm.projector import MMProjector
from viq.model.config import EncoderConfig, HeadConfig, ViQConfig, get_preset
from viq.train.model import TrainBatch, TrainModel

#: Qwen2.5 shapes (hidden, layers, heads, kv heads, intermediate); vocab 151936.
QWEN = {
    "0.5b": (896, 24, 14, 2, 4864),
    "1.5b": (1536, 28, 12, 2, 8960),
    "3b": (2048, 36, 16, 2, 11008),
    "7b": (3584, 28, 28, 4, 18944),
    "tiny": (128, 4, 4, 2, 384),
}


def llm_config(name: str, vocab: int):
    from transformers import Qwen2Config

    hidden, layers, heads, kv, inter = QWEN[name]
    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        max_position_embeddings=32768,
        tie_word_embeddings=name in ("0.5b", "1.5b", "3b", "tiny"),
        rope_theta=1e6,
        use_cache=False,
        attn_implementation="sdpa",
    )


def vision_config(shape: str) -> ViQConfig:
    if shape == "gpu":
        return get_preset("viq-g-16k")
    # CPU: encoder and LLM scaled down together (the encoder keeps several times the LLM's compute per
    # image token, as SigLIP2-g has next to a Qwen2.5-0.5B).
    return ViQConfig(
        name="bench-tiny",
        encoder=EncoderConfig(width=192, depth=8, num_heads=4, mlp_hidden=768, pos_grid=32, pool_head=False),
        head=HeadConfig(attn_dim=32, num_heads=4),
    )


def make_batch(
    args, config: ViQConfig, vocab: int, tokens_per_image: int, offline: bool, g: torch.Generator
) -> TrainBatch:
    """One packed row of ``seq_len`` tokens: conversations of one image + random text. The text (and
    so the number of samples) comes from ``g`` alone, identical for both variants; pixels or codes
    come from a separate generator."""
    g_image = torch.Generator().manual_seed(12345)
    p = config.encoder.patch_size
    grid = (args.image_size // p, args.image_size // p)
    conversations, images, codes = [], [], []
    used = 0
    while True:
        text = int(torch.randint(args.text_min, args.text_max + 1, (1,), generator=g))
        if used + text + tokens_per_image > args.seq_len:
            break
        ids = torch.randint(10, vocab, (text,), generator=g)
        ids[text // 4] = IMAGE_PLACEHOLDER_ID
        labels = ids.clone()
        labels[: text // 2] = IGNORE_INDEX
        labels[ids == IMAGE_PLACEHOLDER_ID] = IGNORE_INDEX
        conversations.append((ids, labels))
        if offline:
            k = config.head.codebook_size
            codes.append(
                Codes(torch.randint(0, k, (*grid, config.head.codes_per_patch), generator=g_image), config.head.levels)
            )
        else:
            images.append(torch.rand(3, args.image_size, args.image_size, generator=g_image) * 2 - 1)
        used += text + tokens_per_image - 1
    return TrainBatch(
        images=images,
        codes=codes,
        conversations=conversations,
        images_per_sample=[1] * len(conversations),
        ids=[str(i) for i in range(len(conversations))],
    )


def _run_variant(
    args, variant: str, llm_name: str, seq_len: int, config: ViQConfig, vocab: int, device: torch.device
) -> dict:
    """Build one variant's model, time it, and free it on return (one model in memory at a time)."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(llm_config(llm_name, vocab))
    projector = MMProjector(config.width, llm.config.hidden_size)
    model = TrainModel(
        "stage1" if variant == "online" else "mllm",
        config,
        llm=llm,
        projector=projector,
        max_length=seq_len,
        losses=("text",),
    )  # the LLM's step, with and without the encoder
    if variant == "offline":
        model.embedder.requires_grad_(False)  # the stored-codes path keeps the embedder frozen
    if args.gradient_checkpointing:
        if model.encoder is not None:
            model.encoder.gradient_checkpointing = True
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(1)
    tokens_per_image = projector.num_tokens((args.image_size // 16, args.image_size // 16))
    args.seq_len = seq_len
    batch = make_batch(args, config, vocab, tokens_per_image, variant == "offline", g).to(device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.dtype == "bfloat16"
        else torch.autocast(device.type, enabled=False)
    )

    def forward():
        with autocast:
            out = model(batch)
        return out.sums["text"] / max(1, batch.num_supervised_tokens)

    def step():
        opt.zero_grad(set_to_none=True)
        forward().backward()
        opt.step()

    def forward_only():
        forward()

    entry = {
        "images": len(batch.codes) + len(batch.images),
        "conversations": len(batch.conversations),
        "trainable_params": sum(p.numel() for p in params),
    }
    try:
        entry["forward_s"] = best_time(forward_only, device, args.repeats)
        entry["step_s"] = best_time(step, device, args.repeats)
    except torch.OutOfMemoryError:
        entry["error"] = "out of memory"
    return entry


def measure(args, llm_name: str, seq_len: int, device: torch.device) -> dict:
    config = vision_config(args.shape)
    vocab = 151936 if args.shape == "gpu" else 1000
    results = {
        variant: _run_variant(args, variant, llm_name, seq_len, config, vocab, device)
        for variant in ("online", "offline")
    }
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "error" not in results["online"] and "error" not in results["offline"]:
        results["forward_reduction_pct"] = 100 * (1 - results["offline"]["forward_s"] / results["online"]["forward_s"])
        results["step_reduction_pct"] = 100 * (1 - results["offline"]["step_s"] / results["online"]["step_s"])
    return results


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=("cpu", "gpu"), default=None, help="default: gpu on cuda, cpu otherwise")
    ap.add_argument("--llm", nargs="+", default=None, help="LLM shapes: tiny, 0.5b, 1.5b, 3b, 7b")
    ap.add_argument("--seq-len", type=int, nargs="+", default=None)
    ap.add_argument("--image-size", type=int, default=None, help="square image side (default 448 gpu / 64 cpu)")
    ap.add_argument("--text-min", type=int, default=64)
    ap.add_argument("--text-max", type=int, default=512)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.shape = args.shape or ("gpu" if gpu else "cpu")
    args.llm = args.llm or (["0.5b", "1.5b", "3b", "7b"] if args.shape == "gpu" else ["tiny"])
    seq_lens = args.seq_len or ([4096, 16384] if args.shape == "gpu" else [512, 1024])
    args.image_size = args.image_size or (448 if args.shape == "gpu" else 128)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if args.shape == "cpu":
        args.text_min, args.text_max = min(args.text_min, 32), min(args.text_max, 128)
    if args.threads:
        torch.set_num_threads(args.threads)
    figures = {}
    for name in args.llm:
        for seq_len in seq_lens:
            r = measure(args, name, seq_len, device)
            figures[f"{name}@{seq_len}"] = r
            print(
                f"{name:5s} {seq_len:6d}  online fwd {r['online'].get('forward_s', float('nan')):.3f}s "
                f"step {r['online'].get('step_s', float('nan')):.3f}s | offline fwd "
                f"{r['offline'].get('forward_s', float('nan')):.3f}s step {r['offline'].get('step_s', float('nan')):.3f}s | "
                f"reduction fwd {r.get('forward_reduction_pct', float('nan')):.1f}% "
                f"step {r.get('step_reduction_pct', float('nan')):.1f}%",
                file=sys.stderr,
            )
    record = {"args": {k: v for k, v in vars(args).items()}, "seq_lens": seq_lens, "figures": figures}
    path = write_record("train_efficiency", device, record, args.out)
    print(f"wrote {path}", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
