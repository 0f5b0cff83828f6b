"""QA evaluation (viq.eval.qa, viq eval-qa): intervals, baselines, real / blank / shuffled images."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from train_helpers import make_llm, make_qa, recipe
from viq.cli.main import main
from viq.data.llava import DataError
from viq.eval import qa as QA
from viq.train.config import TrainConfig
from viq.train.engine import train


def test_wilson_interval():
    lo, hi = QA.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4901624, abs=1e-6) and hi == pytest.approx(0.9433178, abs=1e-6)
    lo, hi = QA.wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611251, abs=1e-6)
    lo, hi = QA.wilson_interval(50, 50)
    assert hi == 1.0 and lo == pytest.approx(0.9286524, abs=1e-6)
    assert QA.wilson_interval(0, 0) == [0.0, 1.0]
    # Exactly 0 / 1 at no / every success, for every n (computed, 0 successes of 3 gave 5.6e-17).
    assert all(QA.wilson_interval(0, n)[0] == 0.0 and QA.wilson_interval(n, n)[1] == 1.0 for n in range(1, 200))
    lo, hi = QA.wilson_interval(120, 240)  # symmetric around 0.5, about +-6 points
    assert lo + hi == pytest.approx(1.0) and 0.06 < 0.5 - lo < 0.065
    with pytest.raises(ValueError):
        QA.wilson_interval(3, 2)


def _rec(task, question, answer, image="x.png"):
    rec = {
        "task": task,
        "question": question,
        "answer": answer,
        "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
    }
    if image:
        rec["image"] = image
    return rec


def test_majority_baseline():
    train_set = [
        _rec("color", "What color is the shape?", "red"),
        _rec("color", "What color is the shape?", "Blue"),
        _rec("color", "What color is the shape?", "blue"),
        _rec("color", "What color is the circle?", "green"),
        _rec("shape", "What shape is this?", "circle"),
        _rec("shape", "What shape is this?", "square"),  # tie: the answer seen first wins
        _rec("count", "How many?", "3"),
        _rec("count", "How many?", "3"),
        _rec("count", "How many?", "7", image=None),  # text-only: ignored
        _rec("count", "How many?", "7", image=None),
        _rec("count", "How many?", "7", image=None),
    ]
    test_set = [
        _rec("color", "What color is the shape?", "blue."),  # template majority: blue -> right
        _rec("color", "What color is the shape?", "red"),  # wrong
        _rec("color", "What color is the circle?", "green"),  # its own template -> right
        _rec("color", "What color is the square?", "blue"),  # unseen template: task majority (blue) -> right
        _rec("shape", "What shape is this?", "circle"),  # tie -> circle -> right
        _rec("count", "How many?", "3"),  # right (text-only 7s not counted)
        _rec("other", "Which?", "blue"),  # unseen task: overall majority (blue) -> right
        _rec("count", "How many?", "3", image=None),  # text-only: not asked
    ]
    result = QA.majority_baseline(train_set, test_set)
    assert result["n"] == 7 and result["images"] == "majority"
    assert result["accuracy"] == pytest.approx(6 / 7)
    assert result["ci95"] == QA.wilson_interval(6, 7)
    assert result["per_task"]["color"] == {"n": 4, "accuracy": 0.75, "ci95": QA.wilson_interval(3, 4)}
    assert set(result["per_task"]) == {"color", "shape", "count", "other"}
    # Records without a task field group under "all".
    plain = [{k: v for k, v in r.items() if k != "task"} for r in test_set]
    assert set(QA.majority_baseline(train_set, plain)["per_task"]) == {"all"}


# ---------------------------------------------------------------------------------------------
# On a tiny trained run
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-qa")
    data = make_qa(root / "qa", n=4)
    # Give half of the records a task, the other half none ("all").
    records = [json.loads(line) for line in data.read_text().splitlines()]
    for i, r in enumerate(records):
        if i % 2 == 0:
            r["task"] = "color"
    records.append(
        {"id": "text", "conversations": [{"from": "human", "value": "What is 1 + 1?"}, {"from": "gpt", "value": "2"}]}
    )
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    llm = make_llm(root / "llm")
    cfg = TrainConfig.from_dict(
        recipe(
            "stage1", root / "runs" / "stage1", data, llm, train={"max_steps": 4, "batch_size": 4, "eval_samples": 0}
        )
    )
    summary = train(cfg)
    model, tokenizer = QA.load_run(root / "runs" / "stage1", "cpu")
    return {
        "root": root,
        "data": data,
        "records": records,
        "final": Path(summary["final"]),
        "model": model,
        "tokenizer": tokenizer,
    }


def test_load_run(run):
    model, _tokenizer = run["model"], run["tokenizer"]
    assert model.stage == "stage1" and model.llm is not None and model.projector is not None
    assert not model.training and not hasattr(model, "teacher")  # a chat model: nothing of training
    assert QA.find_final(run["final"]) == run["final"] == QA.find_final(run["final"].parent)
    # The same weights as the run's output.
    from safetensors.torch import load_file

    saved = load_file(str(run["final"] / "projector.safetensors"))
    assert all(torch.equal(v, model.projector.state_dict()[k]) for k, v in saved.items())
    with pytest.raises(FileNotFoundError, match="not a training run"):
        QA.load_run(run["root"], "cpu")


def test_evaluate_qa_real_blank_shuffled(run, monkeypatch):
    model, tokenizer, records, root = run["model"], run["tokenizer"], run["records"], run["data"].parent
    seen: dict[str, list[torch.Tensor]] = {}
    real_answer = QA.answer_last_questions

    def spy(model_, tokenizer_, conversations, images, device, *, codes=None):
        seen.setdefault(mode, []).extend(xs[0].clone() for xs in images)
        return real_answer(model_, tokenizer_, conversations, images, device, codes=codes)

    monkeypatch.setattr(QA, "answer_last_questions", spy)
    results, examples = {}, {}
    for mode in QA.IMAGE_MODES:
        examples[mode] = []
        results[mode] = QA.evaluate_qa(model, tokenizer, records, root, images=mode, seed=3, examples=examples[mode])
    for mode, result in results.items():
        assert result["images"] == mode and result["n"] == 4  # the text-only record is left out
        assert set(result["per_task"]) == {"color", "all"}
        assert result["per_task"]["color"]["n"] == 2 and result["per_task"]["all"]["n"] == 2
        assert 0.0 <= result["accuracy"] <= 1.0 and result["ci95"][0] <= result["accuracy"] <= result["ci95"][1]
        k = round(result["accuracy"] * 4)
        assert math.isclose(result["accuracy"], k / 4) and result["ci95"] == QA.wilson_interval(k, 4)
        assert [e["id"] for e in examples[mode]] == ["s0", "s1", "s2", "s3"]
        assert all(
            isinstance(e["prediction"], str) and e["answer"] == r["conversations"][-1]["value"]
            for e, r in zip(examples[mode], records)
        )
    real, blank, shuffled = seen["real"], seen["blank"], seen["shuffled"]
    # Real: the images as the training loader prepares them (the run's preprocessing).
    from viq.formats.image import preprocess

    pre = model.preprocess
    for x, r in zip(real, records):
        assert torch.equal(x, preprocess(root / r["image"], pre).pixels)
    # Blank: mid-grey (0 in [-1, 1]) of the same size.
    assert all(b.shape == x.shape and not b.any() for b, x in zip(blank, real))
    # Shuffled: every question sees another record's image (a derangement), fixed by the seed.
    shown = [e["image"][0] for e in examples["shuffled"]]
    own = [e["image"][0] for e in examples["real"]]
    assert sorted(shown) == sorted(own) and all(a != b for a, b in zip(shown, own))
    assert all(any(torch.equal(s, x) for x in real) and not torch.equal(s, x) for s, x in zip(shuffled, real))
    assert examples["blank"][0]["image"] is None
    again = []
    QA.evaluate_qa(model, tokenizer, records, root, images="shuffled", seed=3, examples=again)
    assert [e["image"] for e in again] == [e["image"] for e in examples["shuffled"]]


def test_evaluate_qa_errors_name_the_sample(run, tmp_path):
    model, tokenizer = run["model"], run["tokenizer"]
    root = tmp_path / "data"
    shutil.copytree(run["data"].parent / "images", root / "images")
    (root / "images" / "2.png").unlink()
    with pytest.raises(DataError, match=r"id=s2.*2\.png.*not found"):
        QA.evaluate_qa(model, tokenizer, run["records"], root)
    (root / "images" / "2.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"id=s2.*2\.png"):
        QA.evaluate_qa(model, tokenizer, run["records"], root)
    # Absolute image paths are used as they are.
    records = [{**r, "image": str(run["data"].parent / r["image"])} for r in run["records"] if "image" in r]
    assert QA.evaluate_qa(model, tokenizer, records, tmp_path / "elsewhere")["n"] == 4
    with pytest.raises(ValueError, match="images must be one of"):
        QA.evaluate_qa(model, tokenizer, records, root, images="noise")
    with pytest.raises(ValueError, match="at least 2"):
        QA.evaluate_qa(model, tokenizer, records[:1], root, images="shuffled")


def test_cli_eval_qa(run, tmp_path, capsys):
    out = tmp_path / "qa.json"
    code = main(
        [
            "eval-qa",
            str(run["final"].parent),
            str(run["data"]),
            "--json",
            str(out),
            "--device",
            "cpu",
            "--baselines",
            "--limit",
            "3",
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert {"n", "accuracy", "ci95", "per_task", "baselines"} <= set(result)
    assert result["n"] == 3 and isinstance(result["accuracy"], float) and len(result["ci95"]) == 2
    assert set(result["per_task"]) == {"color", "all"}
    assert all({"n", "accuracy"} <= set(v) for v in result["per_task"].values())
    assert result["per_task"]["color"]["n"] == 2 and result["per_task"]["all"]["n"] == 1
    assert set(result["baselines"]) == {"blank", "shuffled"} and result["baselines"]["blank"]["n"] == 3
    assert set(result["nll"]) == {"real", "blank"} and set(result["nll"]["real"]["per_task"]) == {"color", "all"}
    assert all(v["nll"] > 0 for v in result["nll"].values())
    printed = capsys.readouterr().out
    assert "color" in printed and "overall" in printed and "blank" in printed and "nll real" in printed

    # Image root: the images elsewhere -> --image-root; a missing image names the sample.
    moved = tmp_path / "moved"
    shutil.copytree(run["data"].parent / "images", moved / "images")
    data = tmp_path / "set" / "test.jsonl"
    data.parent.mkdir()
    data.write_text(run["data"].read_text())
    assert main(["eval-qa", str(run["final"]), str(data), "--image-root", str(moved), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["eval-qa", str(run["final"]), str(data), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "viq: error:" in err and "id=s0" in err and "0.png" in err
    # Not a run -> usage error.
    assert main(["eval-qa", str(tmp_path), str(data), "--device", "cpu"]) == 2
    assert "cannot load run" in capsys.readouterr().err


def _stage_model(final: Path):
    """The run's model as training builds it (viq.train.build.build_model from the recipe in stage.json,
    starting from final/ itself, no teacher): what validation answers with."""
    import copy

    from viq.train.build import build_model

    data = copy.deepcopy(json.loads((final / "stage.json").read_text())["recipe"])
    data["model"].update({"init": f"viq:{final}", "config": {}, "previous": None})
    data["loss"]["distill"] = 0.0
    cfg = TrainConfig.from_dict(data)
    model, tokenizer = build_model(cfg, device=torch.device("cpu"))
    return model.eval(), tokenizer, cfg


def test_same_answers_as_training_validation(run):
    """Real images: the chat model (ViQForConditionalGeneration) gives the very predictions of the training
    validation, which answers with the stage's training model (same preprocessing and generation path), and
    its preprocessing is the recipe's at the end of training."""
    import dataclasses

    from viq.train.data import max_pixels_at
    from viq.train.evaluate import evaluate

    stage_model, tokenizer, cfg = _stage_model(run["final"])
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, val=str(run["data"])),
        train=dataclasses.replace(cfg.train, eval_samples=10),
    )
    val_examples, qa_examples = [], []
    metrics = evaluate(stage_model, cfg, tokenizer, torch.device("cpu"), examples=val_examples)
    result = QA.evaluate_qa(run["model"], run["tokenizer"], run["records"], run["data"].parent, examples=qa_examples)
    assert [e["prediction"] for e in val_examples] == [e["prediction"] for e in qa_examples]
    assert metrics["answer_accuracy"] == result["accuracy"]
    assert run["model"].preprocess.max_pixels == max_pixels_at(cfg, cfg.train.max_steps)
    assert run["model"].preprocess.min_pixels == cfg.data.min_pixels


def test_chat_model_equals_the_stage_model_and_round_trips(run, tmp_path):
    """The same image features and the same next-token logits as the training-built model, and
    save_pretrained -> from_pretrained gives the same answers."""
    from viq.formats.image import preprocess
    from viq.mllm.model import ViQForConditionalGeneration

    chat = run["model"]
    stage_model, _, _ = _stage_model(run["final"])
    record = next(r for r in run["records"] if "image" in r)
    pixels = preprocess(run["data"].parent / record["image"], chat.preprocess).pixels
    with torch.no_grad():
        a = chat.projector(chat.encode_features([pixels]).features, chat.encode_features([pixels]).grids)
        b = stage_model.projector(
            stage_model.encode_features([pixels]).features, stage_model.encode_features([pixels]).grids
        )
    assert len(a) == len(b) == 1 and torch.equal(a[0], b[0])
    question = record["conversations"][0]["value"].replace("<image>", "").strip()
    answer = chat.answer(run["data"].parent / record["image"], question, max_new_tokens=6)
    chat.save_pretrained(tmp_path / "saved")
    again = ViQForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert again.answer(run["data"].parent / record["image"], question, max_new_tokens=6) == answer
    assert again.preprocess == chat.preprocess and again.stage == "stage1"
    saved = {p.name for p in (tmp_path / "saved").iterdir()}
    assert {"config.json", "model.safetensors", "projector.safetensors", "stage.json"} <= saved
    assert ("llm" in saved) == (run["final"] / "llm").is_dir()


def test_mllm_run_answers_from_codes(tmp_path, run):
    """A run of the stored-codes stage: load_run brings the encoder of its recipe to encode images."""
    import viq
    from viq.extract import extract

    root = tmp_path
    viq.ViQModel.from_config("viq-test", seed=0).save_pretrained(root / "viq")
    extract(root / "viq", run["data"], root / "store", num_workers=0, progress=False)
    r = recipe("mllm", root / "mllm", run["data"], run["root"] / "llm", train={"max_steps": 2, "eval_samples": 0})
    r["model"] = {"init": f"viq:{root / 'viq'}"}
    r["data"]["codes"] = str(root / "store")
    train(TrainConfig.from_dict(r))
    model, tokenizer = QA.load_run(root / "mllm", "cpu")
    assert model.encoder is None and model.image_encoder is not None and model.reads_codes
    # README's example, as written (paths substituted)
    from viq.mllm.model import ViQForConditionalGeneration

    chat = ViQForConditionalGeneration.from_pretrained(root / "mllm")
    answer = chat.answer(run["data"].parent / run["records"][0]["image"], "What color is the square?")
    assert isinstance(answer, str)
    chat.save_pretrained(root / "my-chat-model")
    assert (
        ViQForConditionalGeneration.from_pretrained(root / "my-chat-model").answer(
            run["data"].parent / run["records"][0]["image"], "What color is the square?"
        )
        == answer
    )
    examples = []
    result = QA.evaluate_qa(model, tokenizer, run["records"], run["data"].parent, images="blank", examples=examples)
    assert result["n"] == 4 and len(examples) == 4
    shutil.rmtree(root / "viq")
    with pytest.raises(FileNotFoundError, match="encoder"):
        QA.load_run(root / "mllm", "cpu")


# ---------------------------------------------------------------------------------------------
# viq ask and viq plot on the same run
# ---------------------------------------------------------------------------------------------


def _first_image(record: dict) -> str:
    return record["image"][0] if isinstance(record["image"], list) else record["image"]


def test_ask_gives_the_answers_of_eval_qa(run):
    """Asker.ask with eval-qa's budget answers what evaluate_qa recorded, question by question
    (single-turn image records: the question is the whole context)."""
    from viq.eval.ask import Asker
    from viq.train.evaluate import answer_budget

    model, tokenizer = run["model"], run["tokenizer"]
    examples: list[dict] = []
    QA.evaluate_qa(model, tokenizer, run["records"], run["data"].parent, examples=examples)
    asker = Asker(model, tokenizer)
    assert len(examples) == 4
    for e in examples:
        shown = e["image"] if isinstance(e["image"], list) else [e["image"]]
        got = asker.ask(
            [run["data"].parent / name for name in shown],
            e["question"],
            max_new_tokens=answer_budget(tokenizer, e["answer"]),
        )
        assert got == e["prediction"], e["id"]


def test_ask_rejects_bad_questions(run):
    from viq.eval.ask import Asker

    asker = Asker(run["model"], run["tokenizer"])
    image = run["data"].parent / _first_image(run["records"][0])
    with pytest.raises(ValueError, match="empty"):
        asker.ask(image, "   ")
    with pytest.raises(ValueError, match="placeholder"):
        asker.ask(image, "<image> <image> which?")
    with pytest.raises(ValueError, match="max_new_tokens"):
        asker.ask(image, "which?", max_new_tokens=0)


def test_cli_ask(run, tmp_path, capsys):
    from viq.eval.ask import ask

    image = run["data"].parent / _first_image(run["records"][0])
    question = "What color is it?"
    expected = ask(run["root"] / "runs" / "stage1", image, question, max_new_tokens=5, device="cpu")
    assert (
        main(
            [
                "ask",
                str(run["root"] / "runs" / "stage1"),
                str(image),
                question,
                "--json",
                "--max-new-tokens",
                "5",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["answer"] == expected and out["stage"] == "stage1" and out["question"] == question
    assert main(["ask", str(tmp_path / "nope"), str(image), question]) == 2
    assert "cannot load run" in capsys.readouterr().err
    assert main(["ask", str(run["root"] / "runs" / "stage1"), str(tmp_path / "missing.png"), question]) == 1
    assert "missing.png" in capsys.readouterr().err


def test_cli_plot(run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    run_dir = run["root"] / "runs" / "stage1"
    out = tmp_path / "curves.png"
    assert main(["plot", str(run_dir), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as im:
        assert im.width > 200 and im.height > 200
    assert main(["plot", str(tmp_path)]) == 1
    assert "metrics.jsonl" in capsys.readouterr().err


def test_answers_in_batches_are_the_answers_alone(run):
    """Questions answered together get what each gets alone (left padding + mask; each answer cut to its
    own budget). The LM head is scaled so that greedy choices are far from ties: batched arithmetic
    differs from one-by-one in the last bits only, which cannot flip a choice with a margin this wide."""
    model, tokenizer, records, root = run["model"], run["tokenizer"], run["records"], run["data"].parent
    head = model.llm.get_output_embeddings().weight
    saved = head.detach().clone()
    try:
        with torch.no_grad():
            head.mul_(100)
        one, together = [], []
        QA.evaluate_qa(model, tokenizer, records, root, batch_size=1, examples=one)
        QA.evaluate_qa(model, tokenizer, records, root, batch_size=3, examples=together)
    finally:
        with torch.no_grad():
            head.copy_(saved)
    assert [e["prediction"] for e in one] == [e["prediction"] for e in together]
    assert len(one) == 4


def test_generate_answers_cuts_each_answer_to_its_budget(run, monkeypatch):
    from viq.mllm.adapters import generate_answers

    model, tokenizer = run["model"], run["tokenizer"]
    prompt = tokenizer.encode_prompt([{"role": "user", "content": "What is 1 + 1?"}])
    longer = tokenizer.encode_prompt([{"role": "user", "content": "What is 1 + 1? Say it twice, then once."}])
    decoded: list[int] = []
    decode = tokenizer.tokenizer.decode
    monkeypatch.setattr(tokenizer.tokenizer, "decode", lambda ids, **kw: decoded.append(len(ids)) or decode(ids, **kw))
    # The same prompt twice in one batch (identical rows), with budgets 1 and 6, beside a longer prompt
    # (so both are left-padded): the first answer is the one-token start of the second.
    one, six, _ = generate_answers(
        model.llm.eval(), tokenizer, [prompt, prompt, longer], [[], [], []], max_new_tokens=[1, 6, 6]
    )
    assert decoded[0] == 1 and 1 <= decoded[1] <= 6 and six.startswith(one)
    with pytest.raises(ValueError, match="one positive budget per prompt"):
        generate_answers(model.llm, tokenizer, [prompt], [[]], max_new_tokens=[1, 2])


def test_answer_nll_is_the_per_token_loss_of_the_answers(run):
    """answer_nll in batches equals the training loss of each conversation computed alone."""
    from viq.mllm.packing import splice_image_features, supervised_lm_loss

    model, tokenizer, records, root = run["model"], run["tokenizer"], run["records"], run["data"].parent
    result = QA.answer_nll(model, tokenizer, records, root, batch_size=3)
    assert result["n"] == 4 and result["images"] == "real" and set(result["per_task"]) == {"color", "all"}
    pre = model.preprocess
    from viq.formats.image import preprocess

    sums: dict[str, list[float]] = {}
    model.eval()
    with torch.no_grad():
        for r in (r for r in records if "image" in r):
            messages = [
                {"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                for t in r["conversations"]
            ]
            enc = tokenizer.encode(messages)
            encoded = model.encode_features([preprocess(root / r["image"], pre).pixels])
            embeds = model.projector(encoded.features, encoded.grids)
            emb, lab = splice_image_features(model.llm.get_input_embeddings(), enc.input_ids, enc.labels, embeds)
            out = supervised_lm_loss(model.llm, {"inputs_embeds": emb[None], "use_cache": False}, lab[None])
            entry = sums.setdefault(r.get("task", "all"), [0.0, 0])
            entry[0] += float(out.loss_sum)
            entry[1] += int(out.num_tokens)
    for task, (total, tokens) in sums.items():
        assert result["per_task"][task]["nll"] == pytest.approx(total / tokens, rel=1e-4)
    blank = QA.answer_nll(model, tokenizer, records, root, images="blank")
    assert blank["n"] == 4 and blank["nll"] != result["nll"]
