"""LLM training on stored codes (stage mllm): learns from the store, equals the online path."""

from __future__ import annotations

import pytest
import torch

import viq
from train_helpers import make_llm, make_qa, recipe
from viq.extract import extract
from viq.train.build import build_model
from viq.train.config import TrainConfig
from viq.train.engine import train
from viq.train.evaluate import evaluate


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mllm")
    data = make_qa(root / "qa", n=4)
    viq.ViQModel.from_config("viq-test", seed=0).save_pretrained(root / "viq")
    counts = extract(root / "viq", data, root / "store", num_workers=0, progress=False)
    assert counts["encoded"] == 4
    return {"root": root, "data": data, "llm": make_llm(root / "llm")}


def mllm_recipe(setup, out, **sections):
    r = recipe("mllm", out, setup["data"], setup["llm"], **sections)
    r["model"] = {"init": f"viq:{setup['root'] / 'viq'}"}
    r["data"].update({"codes": str(setup["root"] / "store"), "val": str(setup["data"])})
    r["llm"]["mode"] = "full"
    return r


def test_llm_learns_from_stored_codes(setup, tmp_path):
    cfg = TrainConfig.from_dict(
        mllm_recipe(setup, tmp_path / "run", train={"max_steps": 40, "batch_size": 4, "eval_samples": 4})
    )
    before_model, tokenizer = build_model(cfg, device=torch.device("cpu"))
    before = evaluate(before_model, cfg, tokenizer, torch.device("cpu"))
    summary = train(cfg)
    losses = [h["text"] for h in summary["history"]]
    assert losses[-1] < 0.3 * losses[0], losses
    after = summary["val"]
    # Answers improve: their held-out likelihood rises sharply, and greedy answers get better (a random
    # LLM answers none of the colours; 0 >= 0 would pass without learning anything).
    assert after["val_text"] < 0.2 * before["val_text"]
    assert after["answer_accuracy"] > before["answer_accuracy"]
    assert (tmp_path / "run" / "final" / "projector.safetensors").is_file()


def test_offline_path_equals_online_path(setup, tmp_path):
    """The MLLM on stored codes sees what a stage-2 model sees from the pixels: a stage output's
    embedder is its dequantiser, so embedder(stored codes) equals dequant(the code values of the image
    encoded now), and the LLM's loss on them is the same."""
    from viq.data.codes import LlavaCodesDataset
    from viq.data.llava import LlavaDataset
    from viq.train.data import Collator

    net = viq.ViQModel.from_pretrained(setup["root"] / "viq")
    net.embedder.load_state_dict(net.dequant.state_dict())  # as every stage output has it
    net.save_pretrained(tmp_path / "viq")
    extract(tmp_path / "viq", setup["data"], tmp_path / "store", num_workers=0, progress=False)
    r = mllm_recipe(setup, tmp_path / "offline")
    r["model"]["init"] = f"viq:{tmp_path / 'viq'}"
    r["data"]["codes"] = str(tmp_path / "store")
    offline, tokenizer = build_model(TrainConfig.from_dict(r), device=torch.device("cpu"))
    s22 = recipe(
        "stage2_2",
        tmp_path / "online",
        setup["data"],
        setup["llm"],
        llm={"mode": "full"},
        loss={"distill": 0.0, "recon": 0.0, "commit": 0.0},
    )
    s22["model"] = {"init": f"viq:{tmp_path / 'viq'}"}
    online, _ = build_model(TrainConfig.from_dict(s22), device=torch.device("cpu"))
    online.projector.load_state_dict(offline.projector.state_dict())
    online.llm.load_state_dict(offline.llm.state_dict())
    offline.eval(), online.eval()
    stored, pixels = LlavaCodesDataset(setup["data"], tmp_path / "store"), LlavaDataset(setup["data"])
    collator = Collator(tokenizer, 256, image_tokens=offline.projector.num_tokens)
    for i in range(len(stored)):
        codes_batch, pixel_batch = collator([stored[i]]), collator([pixels[i]])
        assert len(codes_batch.codes) == len(pixel_batch.images) > 0
        with torch.no_grad():
            from_codes, _ = offline.embed_codes(codes_batch.codes)
            from_pixels = online.encode_features(pixel_batch.images).features
            a, b = offline(codes_batch), online(pixel_batch)
        # The straight-through code values (b + (round(b) - b)) equal the stored table's to float32 rounding.
        for f, g in zip(from_codes, from_pixels, strict=True):
            torch.testing.assert_close(f, g, rtol=1e-5, atol=1e-6)
        assert set(a.sums) == set(b.sums) == {"text"}
        torch.testing.assert_close(a.sums["text"], b.sums["text"], rtol=1e-5, atol=1e-6)


def test_missing_codes_are_named(setup, tmp_path):
    import json

    data = tmp_path / "more.jsonl"
    lines = setup["data"].read_text().splitlines()
    record = json.loads(lines[0])
    record["image"] = "images/unknown.png"
    data.write_text("\n".join(lines + [json.dumps(record)]) + "\n")
    (tmp_path / "images").mkdir()
    from viq.data.codes import LlavaCodesDataset

    with pytest.raises(ValueError, match="no codes"):
        LlavaCodesDataset(data, setup["root"] / "store", image_root=str(setup["data"].parent))
