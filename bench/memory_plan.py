"""Memory plan per training stage of the paper recipes, per GPU, from the models themselves.

For each stage of ``recipes/paper`` (SigLIP2-g/16 ViQ 16k + Qwen2.5-0.5B with DoRA; the MLLM stage with
Qwen2.5-7B, full fine-tuning), at 1 M pixels (one 1024x1024 image per micro-batch, as the recipes'
``batch_size: 1``) with gradient checkpointing:

* **parameters, gradients, optimizer state** -- counted on the *meta-device* model the stage builds
  (:class:`viq.train.model.TrainModel` with the stage's parts, the LLM from its published config, DoRA by
  peft, the stage's trainable groups): float32 master weights (LLM base in ``llm.dtype``), float32
  gradients and two AdamW moments for what trains. FSDP2 shards all of it over the GPUs; the frozen
  teacher and VAE are outside the sharded model and sit whole on every GPU (float32).
* **activations** -- *measured*: a real forward pass at the real widths, with every block stack cut to
  one block (random weights, bfloat16 autocast on the CPU), counting the bytes autograd saves for the
  backward pass (``torch.autograd.graph.saved_tensors_hooks``, one count per storage) per block stack
  and for everything else. With checkpointing a stack of ``n`` blocks keeps its ``n`` block inputs and,
  during the backward pass, one block's saved tensors (the recomputation); the rest is kept as measured.
* **transient**: the frozen VAE's encoder at 1 M pixels (no autograd; its largest feature maps: 3 at a
  time, 96 channels x H x W in float32, the diffusers block structure) and FSDP2's all-gathered
  parameters: the root unit (embeddings, output head, projector: gathered for the whole step) and the two
  largest blocks (the current one and the prefetched next).

    python -m bench.memory_plan                     # writes bench/results/memory_plan-<date>.json, prints the table
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import defaultdict

import torch
from torch import nn

from bench.common import write_record

GIB = 1024**3
#: Published configs (config.json of the Hub repositories).
QWEN = {
    "Qwen2.5-0.5B": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "Qwen2.5-7B": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
}
#: (stage, LLM, llm.mode, the head's quantizer) of the paper recipes.
STAGES = [
    ("stage1", "Qwen2.5-0.5B", "dora", None),
    ("stage2_1", "Qwen2.5-0.5B", "dora", "bottleneck"),
    ("stage2_2", "Qwen2.5-0.5B", "dora", "fsq"),
    ("drawer", None, None, "fsq"),
    ("mllm", "Qwen2.5-7B", "full", "fsq"),
]
#: Block stacks: state-dict prefix of their blocks (the "<n>" is the block index).
STACKS = {
    "encoder": "encoder.blocks.",
    "head": "head.blocks.",
    "code": "head.code_blocks.",
    "recon": "recon.blocks.",
    "drawer": "drawer.latent.blocks.",
    "llm": "llm.",
}


def viq_config(quantizer: str | None, depth: int | None = None):
    import dataclasses

    from viq.model.config import get_preset

    config = get_preset("viq-g-16k")
    if quantizer == "bottleneck":
        config = dataclasses.replace(
            config, head=dataclasses.replace(config.head, quantizer="bottleneck", code_blocks=0)
        )
    if depth is not None:  # one block per stack: the activation measurement
        config = dataclasses.replace(
            config,
            encoder=dataclasses.replace(config.encoder, depth=depth),
            head=dataclasses.replace(
                config.head,
                num_blocks=min(depth, config.head.num_blocks),
                code_blocks=min(depth, config.head.code_blocks),
            ),
            decoder=dataclasses.replace(config.decoder, latent_blocks=depth),
        )
    return config


def build(
    stage: str,
    llm_name: str | None,
    mode: str | None,
    quantizer: str | None,
    *,
    depth: int | None = None,
    device: str = "meta",
):
    """The stage's TrainModel (+ the frozen teacher's and VAE's parameter counts) on ``device``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from viq.mllm.adapters import prepare_llm
    from viq.mllm.projector import MMProjector
    from viq.train.model import TrainModel
    from viq.train.optim import set_trainable
    from viq.train.stages import get_stage

    spec = get_stage(stage)
    config = viq_config(quantizer, depth)
    llm = projector = None
    with torch.device(device):
        if llm_name:
            llm_config = dict(QWEN[llm_name])
            if depth is not None:
                llm_config["num_hidden_layers"] = depth
            llm = Qwen2ForCausalLM(Qwen2Config(**llm_config, attn_implementation="sdpa"))
            llm = prepare_llm(llm, mode, r=64, alpha=16, dropout=0.0)
            projector = MMProjector(config.width, llm_config["hidden_size"])
        weights = {"text": 1.0, "distill": 10.0, "recon": 1.0}
        model = TrainModel(stage, config, llm=llm, projector=projector, parts=spec.active_parts(weights))
    set_trainable(model, list(spec.trainable))
    teacher = (
        sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder."))
        if "distill" in spec.losses and model.encoder is not None
        else 0
    )
    vae = 0
    if spec.vae:
        from viq.model.vae import build_vae

        with torch.device("meta"):
            vae = sum(p.numel() for p in build_vae(config.vae).parameters())
    return model, teacher, vae


def parameter_plan(stage, llm_name, mode, quantizer, gpus: int) -> dict:
    model, teacher, vae = build(stage, llm_name, mode, quantizer)
    trainable = frozen = 0
    frozen_bytes = 0
    units: dict[str, int] = defaultdict(int)  # FSDP units: each block, then the root
    for name, p in model.named_parameters():
        size = p.numel()
        if p.requires_grad:
            trainable += size
        else:
            frozen += size
            frozen_bytes += size * p.element_size()
        unit = next(
            (
                name[: name.index(".", len(prefix)) + 1]
                for prefix in STACKS.values()
                if name.startswith(prefix) and prefix != "llm." and "." in name[len(prefix) :]
            ),
            None,
        )
        if unit is None and ".layers." in name:
            cut = name.index(".layers.") + len(".layers.")
            unit = name[: name.index(".", cut) + 1]
        units[unit or "root"] += size * p.element_size()
    sharded = trainable * 4 + frozen_bytes  # master weights (float32) + frozen weights in their dtype
    grads, optimizer = trainable * 4, trainable * 8
    # The root unit (embeddings, output head, projector, pools...) stays gathered through the forward and
    # backward passes; blocks are gathered one at a time, the next one prefetched.
    gathered = units["root"] + sum(sorted((v for k, v in units.items() if k != "root"), reverse=True)[:2])
    return {
        "trainable_params": trainable,
        "frozen_params": frozen,
        "teacher_params": teacher,
        "vae_params": vae,
        "weights_gib": sharded / GIB,
        "grads_gib": grads / GIB,
        "optimizer_gib": optimizer / GIB,
        "helpers_gib": (teacher + vae) * 4 / GIB,
        "per_gpu_states_gib": (sharded + grads + optimizer) / gpus / GIB,
        "fsdp_gathered_gib": gathered / GIB,
    }


class SavedBytes:
    """Bytes autograd saves for backward during a forward pass, per module path (one count per storage)."""

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[str] = []
        self.by_module: dict[str, int] = defaultdict(int)
        self.seen: set[int] = set()
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(lambda m, a, n=name: self.stack.append(n)))
            self.handles.append(module.register_forward_hook(lambda m, a, o: self._leave()))

    def _leave(self) -> None:  # a forward hook must return None (anything else replaces the output)
        self.stack.pop()

    def pack(self, t: torch.Tensor):
        # Parameters are not activations; everything else saved is (the autocast copies of weights included).
        if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
            key = t.untyped_storage().data_ptr()
            if key not in self.seen:
                self.seen.add(key)
                self.by_module[self.stack[-1] if self.stack else ""] += t.untyped_storage().nbytes()
        return t

    @contextlib.contextmanager
    def counting(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield
        for h in self.handles:
            h.remove()


def activation_plan(stage, llm_name, mode, quantizer, side: int, text_tokens: int) -> dict:
    """Saved-for-backward bytes of one micro-batch (one side x side image, a conversation of
    ``text_tokens``), per block of each stack and for the rest, measured at depth 1."""
    from viq.mllm.chat import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
    from viq.train.model import TrainBatch

    torch.manual_seed(0)
    model, _, _ = build(stage, llm_name, mode, quantizer, depth=1, device="cpu")
    model.train()
    image = torch.rand(3, side, side) * 2 - 1
    batch = TrainBatch(images=[image], images_per_sample=[1], ids=["x"])
    if stage == "mllm":
        from viq.formats.codes import Codes

        g = side // 16
        levels = model.config.head.levels
        batch = TrainBatch(
            images=[], codes=[Codes(torch.zeros(g, g, 4, dtype=torch.int32), levels)], images_per_sample=[1], ids=["x"]
        )
    if model.llm is not None:
        ids = torch.randint(0, 1000, (text_tokens,))
        ids[5] = IMAGE_PLACEHOLDER_ID
        labels = ids.clone()
        labels[: text_tokens // 2] = IGNORE_INDEX
        batch.conversations = [(ids, labels)]
    if stage in ("stage2_1", "stage2_2", "drawer"):
        from viq.model.vae import build_vae

        model.set_vae(build_vae(model.config.vae.__class__(base_dim=8)))  # the target's values do not matter here
    counter = SavedBytes(model)
    with counter.counting(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(batch)
    per_block: dict[str, int] = defaultdict(int)
    block_input: dict[str, int] = {}
    rest = 0
    for path, nbytes in counter.by_module.items():
        stack = next((s for s, prefix in STACKS.items() if s != "llm" and path.startswith(prefix)), None)
        if stack is None and ".layers." in path:
            stack = "llm"
        if stack is None:
            rest += nbytes
        else:
            per_block[stack] += nbytes
    # the residual stream entering each block (float32, tokens x width): what checkpointing keeps
    patches = (side // 16) ** 2
    width = model.config.width
    block_input.update(
        encoder=patches * width * 4,
        head=patches * width * 4,
        code=4 * patches * width * 4,
        recon=patches * width * 4,
        drawer=patches * width * 4,
    )
    if model.llm is not None:
        hidden = model.llm.config.hidden_size if hasattr(model.llm, "config") else QWEN[llm_name]["hidden_size"]
        tokens = text_tokens - 1 + model.projector.num_tokens((side // 16, side // 16))
        block_input["llm"] = tokens * hidden * 4
    return {"per_block": dict(per_block), "block_input": {k: block_input[k] for k in per_block}, "rest": rest}


def stage_depths(quantizer: str | None, llm_name: str | None) -> dict[str, int]:
    config = viq_config(quantizer)
    depths = {
        "encoder": config.encoder.depth,
        "head": config.head.num_blocks,
        "code": config.head.code_blocks,
        "recon": config.decoder.latent_blocks,
        "drawer": config.decoder.latent_blocks,
    }
    if llm_name:
        depths["llm"] = QWEN[llm_name]["num_hidden_layers"]
    return depths


def plan(gpus: int, side: int, text_tokens: int) -> list[dict]:
    rows = []
    for stage, llm_name, mode, quantizer in STAGES:
        params = parameter_plan(stage, llm_name, mode, quantizer, gpus)
        acts = activation_plan(stage, llm_name, mode, quantizer, side, text_tokens)
        depths = stage_depths(quantizer, llm_name)
        kept = acts["rest"] + sum(depths[s] * acts["block_input"][s] for s in acts["per_block"])
        recompute = max(acts["per_block"].values(), default=0)
        no_ckpt = acts["rest"] + sum(depths[s] * acts["per_block"][s] for s in acts["per_block"])
        vae_transient = 3 * 96 * side * side * 4 if stage in ("stage2_1", "stage2_2", "drawer") else 0
        total = (
            params["per_gpu_states_gib"]
            + params["helpers_gib"]
            + params["fsdp_gathered_gib"]
            + (kept + recompute + vae_transient) / GIB
        )
        rows.append(
            {
                "stage": stage,
                "llm": llm_name,
                "llm_mode": mode,
                **params,
                "activations_checkpointed_gib": (kept + recompute) / GIB,
                "activations_without_checkpointing_gib": no_ckpt / GIB,
                "vae_transient_gib": vae_transient / GIB,
                "per_gpu_total_gib": total,
                "activation_detail": acts,
                "depths": depths,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--side", type=int, default=1024, help="image side in pixels (1024: 1 M pixels)")
    p.add_argument("--text-tokens", type=int, default=512, help="text tokens of the conversation")
    p.add_argument("--out")
    args = p.parse_args(argv)
    rows = plan(args.gpus, args.side, args.text_tokens)
    print(
        f"{'stage':9} {'trainable':>10} {'frozen':>10} {'states/GPU':>11} {'helpers':>8} {'acts(ckpt)':>11} "
        f"{'acts(none)':>11} {'total/GPU':>10}  (GiB; {args.gpus} GPUs, FSDP2, {args.side}^2 px)"
    )
    for r in rows:
        print(
            f"{r['stage']:9} {r['trainable_params'] / 1e6:9.0f}M {r['frozen_params'] / 1e6:9.0f}M "
            f"{r['per_gpu_states_gib']:11.2f} {r['helpers_gib']:8.2f} {r['activations_checkpointed_gib']:11.2f} "
            f"{r['activations_without_checkpointing_gib']:11.2f} {r['per_gpu_total_gib']:10.2f}"
        )
    path = write_record(
        "memory_plan",
        torch.device("cpu"),
        {"gpus": args.gpus, "side": args.side, "text_tokens": args.text_tokens, "stages": rows},
        args.out,
    )
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
