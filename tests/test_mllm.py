"""LLM training on stored codes (stage mllm): learns from the store, equals the online path."""

from __future__ import annotations

import pytest
import torch
from train_helpers import make_llm, make_qa, recipe

import viq
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
    cfg = TrainConfig.from_dict(mllm_recipe(setup, tmp_path / "run", train={"max_steps": 40, "batch_size": 4,
                                                                             "eval_samples": 4}))
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
    """Codes from the store -> embedder equals encoding the image now and embedding its codes."""
    cfg = TrainConfig.from_dict(mllm_recipe(setup, tmp_path / "eq"))
    model, tokenizer = build_model(cfg, device=torch.device("cpu"))
    model.eval()
    online = viq.load(setup["root"] / "viq")
    from viq.data.llava import LlavaDataset
    from viq.data.codes import LlavaCodesDataset
    from viq.train.data import Collator

    stored = LlavaCodesDataset(setup["data"], setup["root"] / "store")
    pixels = LlavaDataset(setup["data"])
    collator = Collator(tokenizer, 256, image_tokens=model.projector.num_tokens)
    for i in range(len(stored)):
        offline_batch = collator([stored[i]])
        codes_now = online.encode_pixels(pixels[i].images)
        # Counts first: zip() would silently pass if the collator dropped codes.
        assert len(offline_batch.codes) == len(codes_now) == len(pixels[i].images) > 0
        assert all(a.same_codes(b) for a, b in zip(offline_batch.codes, codes_now))
        feats, _ = model.code_features(offline_batch.codes)
        expected = online.embed(codes_now)
        assert len(feats) == len(expected)
        for f, g in zip(feats, expected):
            assert torch.equal(f, g)
        online_batch = collator([stored[i]])
        online_batch.codes = codes_now
        with torch.no_grad():
            a, b = model(offline_batch), model(online_batch)
        assert torch.equal(a["text_sum"], b["text_sum"])


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
