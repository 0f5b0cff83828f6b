"""Gradient checkpointing changes memory, never gradients: equal gradients with and without it for every
part that trains (trunk, code head, latent decoder, LLM adapter), and DoRA + checkpointing + FSDP2 on
two processes follow the one-process run."""

from __future__ import annotations

import pytest
import torch

from train_helpers import make_llm, make_qa, recipe, run_recipe
from viq.train.build import build_model
from viq.train.config import TrainConfig
from viq.train.data import BatchStream, Collator
from viq.train.engine import enable_gradient_checkpointing, prepare_model
from viq.train.parallel import Dist

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {"data": make_qa(root / "qa", n=8), "llm": make_llm(root / "llm")}


def _gradients(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model, tokenizer = build_model(cfg, device=CPU)
    prepare_model(model, cfg)
    collator = Collator(tokenizer, cfg.llm.max_length, image_tokens=model.projector.num_tokens)
    batch = BatchStream(cfg, Dist(), collator, 0).next(0)
    out = model(batch)
    assert {"text", "distill", "recon"} <= set(out.sums)
    sum(out.sums.values()).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_checkpointing_gives_the_same_gradients(assets, tmp_path):
    r = recipe("stage2_2", tmp_path / "run", assets["data"], assets["llm"], llm={"mode": "dora", "lora_dropout": 0.0})
    plain = _gradients(TrainConfig.from_dict(r))
    r["train"]["gradient_checkpointing"] = True
    checkpointed = _gradients(TrainConfig.from_dict(r))
    assert plain.keys() == checkpointed.keys()
    for part in ("encoder.blocks.", "head.code_blocks.", "recon.blocks.", "llm.", "projector."):
        assert any(k.startswith(part) for k in plain), part  # every part with blocks is compared
    # The same kernels recompute the same inputs: equal up to float32 rounding of the recomputation.
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=1e-5, atol=1e-7, msg=k)


def test_every_block_stack_is_switched_on(assets, tmp_path):
    r = recipe("stage2_2", tmp_path / "run", assets["data"], assets["llm"], llm={"mode": "dora"})
    model, _ = build_model(TrainConfig.from_dict(r), device=CPU)
    switched = enable_gradient_checkpointing(model)
    assert {"encoder", "head", "recon", "llm"} <= set(switched)
    base = model.llm.get_base_model()
    assert base.is_activation_checkpointing


def test_an_llm_that_cannot_checkpoint_is_refused(assets, tmp_path):
    r = recipe("stage2_2", tmp_path / "run", assets["data"], assets["llm"], llm={"mode": "full"})
    model, _ = build_model(TrainConfig.from_dict(r), device=CPU)

    class NoCheckpointing(torch.nn.Module):  # an LLM class without transformers' switch
        pass

    model.llm = NoCheckpointing()
    with pytest.raises(ValueError, match="NoCheckpointing.*gradient_checkpointing=false"):
        enable_gradient_checkpointing(model)


def test_dora_checkpointing_fsdp2_on_two_processes(assets, tmp_path):
    """DoRA adapters, activation checkpointing and FSDP2 sharding together: two processes give the
    losses of one (the same tolerance as every 1- vs 2-process comparison: float32 sums in another order)."""

    def make(out, world):
        return recipe(
            "stage2_2",
            out,
            assets["data"],
            assets["llm"],
            optim={"lr": 1e-3},
            llm={"mode": "dora", "lora_dropout": 0.0},
            train={
                "max_steps": 3,
                "parallel": "fsdp",
                "batch_size": 4 // world,
                "gradient_checkpointing": True,
                "save_every": 0,
            },
        )

    one = run_recipe(make(tmp_path / "one", 1), 1)
    two = run_recipe(make(tmp_path / "two", 2), 2)
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a, b)
