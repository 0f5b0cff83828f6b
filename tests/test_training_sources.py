"""Where a stage's frozen parts and its LLM come from: vae.path (diffusers / pixel-codec folders, Hub
ids), the LLM's dtype / attention / system prompt, and which projector and adapter carry over."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

import viq
from train_helpers import make_llm, make_qa, recipe
from viq.demo import public_checkpoints as pc
from viq.model.config import VAEConfig
from viq.model.pixel_codec import PixelCodec
from viq.model.vae import load_vae, save_vae
from viq.train.build import build_model
from viq.train.config import TrainConfig
from viq.train.engine import train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    viq.ViQModel.from_config("viq-test", seed=0).save_pretrained(root / "init")
    return {
        "root": root,
        "data": make_qa(root / "qa", n=4),
        "llm": make_llm(root / "llm"),
        "vae": pc.qwen_image_vae(root / "qwen-vae", base_dim=4, seed=3),
    }


def test_vae_folders_round_trip(tmp_path, assets):
    codec = PixelCodec(VAEConfig(kind="pixel-codec", base_dim=8, num_res_blocks=1, decoder_res_blocks=1))
    torch.nn.init.normal_(codec.dec_in.weight)
    config, loaded = load_vae(save_vae(codec, tmp_path / "codec"))
    assert config.kind == "pixel-codec" and config.base_dim == 8
    assert all(torch.equal(a, b) for a, b in zip(codec.state_dict().values(), loaded.state_dict().values()))
    config, loaded = load_vae(assets["vae"])
    published = load_file(str(assets["vae"] / "diffusion_pytorch_model.safetensors"))
    assert config.kind == "qwen-image" and config.base_dim == 4
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in published.items())
    # Errors name the folder and what is wrong with it.
    with pytest.raises(FileNotFoundError, match="not a VAE folder"):
        load_vae(tmp_path / "nothing")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="AutoencoderKL.*Qwen-Image"):
        load_vae(other)


def test_vae_path_is_the_target_and_travels_with_the_output(tmp_path, assets):
    """vae.path replaces the init's vae.* and is written into the output; the next stage and viq.load
    use exactly those weights."""
    r = recipe(
        "stage2_1",
        tmp_path / "s21",
        assets["data"],
        assets["llm"],
        train={"max_steps": 1},
        vae={"path": str(assets["vae"])},
    )
    r["model"]["init"] = f"viq:{assets['root'] / 'init'}"
    model, _ = build_model(TrainConfig.from_dict(r), device=CPU)
    published = load_file(str(assets["vae"] / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(model.vae.state_dict()[k], v) for k, v in published.items())
    assert model.config.vae.base_dim == 4
    final = train(TrainConfig.from_dict(r))["final"]
    stored = {k[4:]: v for k, v in load_file(f"{final}/model.safetensors").items() if k.startswith("vae.")}
    assert stored.keys() == published.keys() and all(torch.equal(stored[k], v) for k, v in published.items())
    nxt = recipe("stage2_2", tmp_path / "s22", assets["data"], assets["llm"], train={"max_steps": 1})
    nxt["model"]["init"] = f"viq:{final}"
    model, _ = build_model(TrainConfig.from_dict(nxt), device=CPU)
    assert all(torch.equal(model.vae.state_dict()[k], v) for k, v in published.items())


def test_a_random_vae_only_for_presets(tmp_path, assets, caplog):
    s1 = recipe("stage1", tmp_path / "s1", assets["data"], assets["llm"], train={"max_steps": 1})
    s1["model"]["init"] = "preset:viq-test"
    final = train(TrainConfig.from_dict(s1))["final"]
    # The preset's random VAE is not carried by stage 1 (it builds none): stage 2-1 has no VAE to use.
    r = recipe("stage2_1", tmp_path / "s21", assets["data"], assets["llm"])
    r["model"]["init"] = f"viq:{final}"
    with pytest.raises(ValueError, match="vae.path"):
        build_model(TrainConfig.from_dict(r), device=CPU)
    r["model"]["init"] = "preset:viq-test"
    build_model(TrainConfig.from_dict(r), device=CPU)
    assert any("randomly initialised VAE" in rec.getMessage() for rec in caplog.records)


def test_llm_dtype_attention_and_system_prompt(tmp_path, assets):
    r = recipe(
        "stage1",
        tmp_path / "run",
        assets["data"],
        assets["llm"],
        llm={"mode": "dora", "dtype": "bfloat16", "attention": "eager"},
    )
    model, tokenizer = build_model(TrainConfig.from_dict(r), device=CPU)
    base = model.llm.get_base_model()
    assert base.config._attn_implementation == "eager"
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in model.llm.named_parameters() if p.requires_grad} == {torch.float32}
    text = tokenizer.render([{"role": "user", "content": "q"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    with pytest.raises(ValueError, match="llm.dtype"):
        TrainConfig.from_dict(recipe("stage1", tmp_path / "x", assets["data"], assets["llm"], llm={"dtype": "fp8"}))


def test_llm_identity_does_not_depend_on_dtype_or_place(tmp_path, assets):
    import shutil

    from viq.mllm.adapters import llm_identity, load_causal_lm

    a, _ = load_causal_lm(assets["llm"])
    b, _ = load_causal_lm(assets["llm"], dtype=torch.bfloat16)
    shutil.copytree(assets["llm"], tmp_path / "moved")
    c, _ = load_causal_lm(tmp_path / "moved")
    assert llm_identity(a) == llm_identity(b) == llm_identity(c)
    with torch.no_grad():
        c.model.layers[1].mlp.down_proj.weight[0, 0] += 0.5  # a fine-tuned variant
    assert llm_identity(c)["weights"] != llm_identity(a)["weights"]


def test_projector_and_adapter_carry_over_only_when_they_fit(tmp_path, assets, caplog):
    s1 = recipe(
        "stage1",
        tmp_path / "s1",
        assets["data"],
        assets["llm"],
        train={"max_steps": 2},
        llm={"mode": "lora", "lora_r": 4},
    )
    s1["model"]["init"] = f"viq:{assets['root'] / 'init'}"
    final = train(TrainConfig.from_dict(s1))["final"]
    projector = load_file(f"{final}/projector.safetensors")
    adapter = load_file(f"{final}/llm/adapter_model.safetensors")

    def built(**llm):
        r = recipe(
            "stage2_1", tmp_path / "s21", assets["data"], assets["llm"], llm={"mode": "lora", "lora_r": 4, **llm}
        )
        r["model"]["init"] = f"viq:{final}"
        return build_model(TrainConfig.from_dict(r), device=CPU)[0]

    def same_projector(model):
        return all(torch.equal(model.projector.state_dict()[k], v) for k, v in projector.items())

    model = built()  # the same LLM and LoRA settings: both carry over
    assert same_projector(model)
    state = model.llm.state_dict()
    lora_a = [k for k in state if "lora_A" in k][0]
    assert torch.equal(state[lora_a], adapter[lora_a.replace(".default", "")])
    assert not same_projector(built(inherit=False))  # false: fresh
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert not same_projector(built(lora_r=8))  # another LoRA rank: both start fresh, and the log says why
    assert any("start fresh" in r.getMessage() and "lora_r" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="llm.inherit=true.*lora_r"):
        built(lora_r=8, inherit=True)
