"""The paper's pipeline from what a user downloads, in the published formats.

Checkpoints are written by the real library classes with their real key layouts and config files
(:mod:`viq.demo.public_checkpoints`: transformers ``Siglip2Model`` / ``SiglipModel``, an open_clip state
dict, the authors' stage-1 file, Qwen2.5-style LLMs with Qwen's ChatML tokenizer -- a base one whose eos
is ``<|endoftext|>`` and an instruct one of another width --, diffusers ``AutoencoderKLQwenImage``),
at small widths (the formats are the published ones; CI time is not). The Qwen LLM and VAE lie in a
Hugging Face cache under their Hub ids, so ``recipes/paper/*.yaml`` run with only paths and step counts
changed, through the command line: stage 1 (from each SigLIP format) -> 2-1 -> 2-2 -> drawer ->
encode -> decode -> extract -> train-mllm with the other LLM -> eval-qa.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from viq.cli.main import main
from viq.demo import public_checkpoints as pc

RECIPES = Path(__file__).resolve().parents[1] / "src" / "viq" / "recipes" / "paper"
VISION = pc.VisionWidths(hidden=64, heads=4, mlp=128, layers=2)
LLM_A = pc.LLMWidths(hidden=64, heads=4, kv_heads=2, intermediate=128, layers=2)
LLM_B = pc.LLMWidths(hidden=96, heads=4, kv_heads=2, intermediate=160, layers=2)


def _data(root: Path) -> dict[str, Path]:
    """8 QA records (4 sizes; every other one with the authors' per-record resize), the same images
    as a folder (drawer), and as LLaVA-OneVision-style Parquet with the image bytes in the rows."""
    return pc.colour_square_qa(
        root, 8, sizes=[(96, 144), (150, 100), (64, 64), (200, 120)], square=(10, 40), resize="224x32"
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("public")
    art = root / "downloads"
    corpus = ["What color is the square? " + " ".join(pc.COLOURS) + " a photo"] * 20
    paths = {
        "naflex": pc.hf_siglip2_naflex(art / "siglip2-naflex", VISION),
        "siglip384": pc.hf_siglip(art / "siglip2-384", VISION),
        "open_clip": pc.open_clip_siglip(art / "ViT-gopt-16-SigLIP2-384", VISION),
        "authors": pc.authors_stage1(art / "authors", VISION, pos_grid=32),
        "llm_a": pc.qwen2_llm(art / "Qwen2.5-0.5B", corpus, LLM_A),
        "llm_b": pc.qwen2_llm(art / "Qwen2.5-1.5B-Instruct", corpus, LLM_B, instruct=True, seed=1),
        "vae": pc.qwen_image_vae(art / "vae", base_dim=16),
    }
    cache = root / "hf-cache"
    pc.hub_cache_entry(cache, "Qwen/Qwen-Image", paths["vae"], subfolder="vae")
    pc.hub_cache_entry(cache, "Qwen/Qwen2.5-0.5B", paths["llm_a"])
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_CACHE", str(cache))
    mp.setenv("HF_HUB_OFFLINE", "1")
    request.addfinalizer(mp.undo)
    return {"root": root, "paths": paths, "data": _data(root / "data"), "runs": root / "runs"}


def _train(world, recipe: str, out: str, *overrides: str, command: str = "train") -> int:
    """``viq train --config recipes/paper/<recipe>.yaml`` with paths and step counts changed."""
    d = world["data"]
    common = [
        f"train.output_dir={world['runs'] / out}",
        "train.max_steps=2",
        "train.save_every=0",
        "train.precision=fp32",
        "train.progress=false",
    ]
    if recipe != "drawer":
        common += [f"data.train={d['jsonl']}", f"data.image_root={d['root']}", "data.resolution_schedule=[]"]
    if recipe == "stage1":
        common += [f"data.val={d['jsonl']}", "train.eval_every=1", "train.eval_samples=2"]
    return main([command, "--config", str(RECIPES / f"{recipe}.yaml"), *common, *overrides])


@pytest.fixture(scope="module")
def chain(world):
    runs, paths = world["runs"], world["paths"]
    codes = {}
    codes["stage1"] = _train(world, "stage1", "stage1", f"model.init=hf-siglip:{paths['naflex']}")
    codes["stage2_1"] = _train(world, "stage2_1", "stage2_1", f"model.init=viq:{runs / 'stage1' / 'final'}")
    codes["stage2_2"] = _train(world, "stage2_2", "stage2_2", f"model.init=viq:{runs / 'stage2_1' / 'final'}")
    codes["drawer"] = _train(
        world,
        "drawer",
        "drawer",
        f"model.init=viq:{runs / 'stage2_2' / 'final'}",
        f"data.train={world['data']['folder']}",
    )
    return codes


def test_every_stage_runs_from_public_checkpoints(chain, world):
    assert chain == {"stage1": 0, "stage2_1": 0, "stage2_2": 0, "drawer": 0}
    runs = world["runs"]
    stage1 = json.loads((runs / "stage1" / "final" / "stage.json").read_text())
    # the teacher is SigLIP2 as published: its own 16x16 NaFlex table, not the student's 128x128 resize
    assert (
        stage1["teacher"]["encoder"]["pos_grid"] == 16
        and stage1["recipe"]["model"]["config"]["encoder"]["pos_grid"] == 128
    )
    evals = [
        json.loads(line)
        for line in (runs / "stage1" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "eval"
    ]
    assert evals, "stage 1 validated (eval_every with data.val)"
    assert stage1["llm"]["identity"]["hidden_size"] == LLM_A.hidden


@pytest.mark.parametrize("source", ["siglip384", "open_clip", "authors"])
def test_stage1_from_the_other_siglip_formats(world, source):
    spec = {"siglip384": "hf-siglip:", "open_clip": "timm-siglip:", "authors": "timm-siglip:"}[source]
    extra = []
    if source == "authors":  # the authors' stage-1 file is not the teacher: the published SigLIP2 is
        extra = [f"loss.teacher=timm-siglip:{world['paths']['open_clip']}"]
    assert (
        _train(
            world,
            "stage1",
            f"stage1-{source}",
            f"model.init={spec}{world['paths'][source]}",
            "train.max_steps=1",
            "train.eval_every=0",
            *extra,
        )
        == 0
    )
    final = world["runs"] / f"stage1-{source}" / "final"
    teacher = json.loads((final / "stage.json").read_text())["teacher"]
    assert teacher["encoder"]["pos_grid"] == 24  # 384 / 16: the published table, unresized


def test_a_stage_that_needs_a_vae_and_gets_none_stops_before_training(world, chain, caplog):
    caplog.set_level(logging.ERROR)
    out = world["runs"] / "no-vae"
    rc = _train(world, "stage2_1", "no-vae", f"model.init=viq:{world['runs'] / 'stage1' / 'final'}", "vae.path=null")
    assert rc != 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "vae.path" in errors[0] and "Qwen/Qwen-Image/vae" in errors[0]
    assert not (out / "checkpoints").exists() and not (out / "final").exists()


def test_the_model_carries_the_diffusers_vae(world, chain):
    from safetensors.torch import load_file

    import viq

    published = load_file(str(world["paths"]["vae"] / "diffusion_pytorch_model.safetensors"))
    for stage in ("stage2_1", "stage2_2", "drawer"):
        model = viq.load(world["runs"] / stage / "final") if stage != "stage2_1" else None
        stored = load_file(str(world["runs"] / stage / "final" / "model.safetensors"))
        vae = {k[4:]: v for k, v in stored.items() if k.startswith("vae.")}
        assert vae.keys() == published.keys(), stage
        assert all(torch.equal(vae[k], published[k]) for k in published), stage
        if model is not None:
            assert model.config.vae.base_dim == 16 and model.vae is not None


def test_encode_decode_extract_and_an_mllm_with_another_llm(world, chain, caplog, tmp_path):
    from viq.data.llava import LlavaDataset
    from viq.formats.image import padded_grid
    from viq.store.ids import image_id
    from viq.store.reader import CodeStore

    runs, d = world["runs"], world["data"]
    final = runs / "drawer" / "final"
    assert main(["encode", str(final), str(d["folder"]), "-o", str(tmp_path / "codes")]) == 0
    assert main(["decode", str(final), str(tmp_path / "codes"), "-o", str(tmp_path / "recon")]) == 0
    assert len(list((tmp_path / "recon").glob("*.png"))) == 8
    store = runs / "codes.store"
    assert main(["extract", str(final), str(d["jsonl"]), "-o", str(store), "--workers", "0"]) == 0
    # The stored codes describe the pixels training sees, the records' own resize included.
    dataset, codes = LlavaDataset(d["jsonl"]), CodeStore.open(store)
    resized = 0
    for i in range(len(dataset)):
        for ref, pixels in zip(dataset.record(i).images, dataset[i].images):
            grid = padded_grid(pixels.shape[1], pixels.shape[2])
            assert codes.get(image_id(ref.path, d["root"])).grid == grid, ref
            resized += ref.resize is not None
    assert resized == 4

    # An MLLM on the stored codes, with an LLM of another width than the tokenizer stages used,
    # starting from stage 2-2's output (which holds a projector and adapter for the first LLM).
    caplog.set_level(logging.INFO)
    rc = _train(
        world,
        "mllm",
        "mllm",
        f"model.init=viq:{runs / 'stage2_2' / 'final'}",
        f"llm.path={world['paths']['llm_b']}",
        "llm.mode=dora",
        "llm.lora_r=8",
        f"data.codes={store}",
        f"data.val={d['jsonl']}",
        "train.eval_every=0",
        "train.batch_size=2",
        "train.grad_accum=1",
        "train.parallel=ddp",
        "train.gradient_checkpointing=false",
        command="train-mllm",
    )
    assert rc == 0
    assert any("start fresh" in r.getMessage() and "made for" in r.getMessage() for r in caplog.records)
    # Taking them over anyway is an explicit choice, refused with one line when they do not fit.
    caplog.clear()
    rc = _train(
        world,
        "mllm",
        "mllm-inherit",
        f"model.init=viq:{runs / 'stage2_2' / 'final'}",
        f"llm.path={world['paths']['llm_b']}",
        "llm.inherit=true",
        f"data.codes={store}",
        f"data.val={d['jsonl']}",
        "train.eval_every=0",
        "train.parallel=ddp",
        command="train-mllm",
    )
    assert rc != 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "llm.inherit=true" in errors[0] and "made for" in errors[0]
    assert (
        main(["eval-qa", str(runs / "mllm"), str(d["jsonl"]), "--baselines", "--json", str(tmp_path / "qa.json")]) == 0
    )
    result = json.loads((tmp_path / "qa.json").read_text())
    assert result["n"] == 8 and set(result["baselines"]) == {"blank", "shuffled"}


def test_stage1_reads_parquet_with_image_bytes(world):
    d = world["data"]
    assert (
        _train(
            world,
            "stage1",
            "stage1-parquet",
            f"model.init=hf-siglip:{world['paths']['naflex']}",
            f"data.train={d['parquet']}",
            "train.max_steps=1",
            "train.eval_every=0",
        )
        == 0
    )


def test_generation_stops_at_the_end_of_the_turn_with_a_base_tokenizer(world, tmp_path):
    """A base Qwen2.5 tokenizer's eos is <|endoftext|>; answers end with the template's <|im_end|>."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from viq.mllm.adapters import generate_answer
    from viq.mllm.chat import ChatTokenizer

    hf = AutoTokenizer.from_pretrained(world["paths"]["llm_a"])
    assert hf.eos_token == "<|endoftext|>"
    chat = ChatTokenizer(hf, system_prompt="You are a helpful assistant.")
    im_end = hf.convert_tokens_to_ids("<|im_end|>")
    assert chat.end_of_turn == "<|im_end|>" and im_end in chat.end_of_turn_ids
    # A 0-layer Qwen2 whose next token is a fixed function of the current one: after the prompt's "\n",
    # "red", then <|im_end|>, "\n", "red", ... -- a model that has learnt to end its turn.
    newline = hf.convert_tokens_to_ids(hf.tokenize("\n"))[0]
    red = hf("red", add_special_tokens=False)["input_ids"]
    assert newline not in red and len(set(red)) == len(red)
    n = len(hf)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=n,
            hidden_size=n,
            num_hidden_layers=0,
            num_attention_heads=1,
            num_key_value_heads=1,
            intermediate_size=4,
            tie_word_embeddings=False,
            eos_token_id=hf.eos_token_id,
            pad_token_id=hf.pad_token_id,
        )
    ).eval()
    chain = [newline, *red, im_end]
    following = dict(zip(chain, chain[1:] + [newline]))
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(n))
        model.lm_head.weight.zero_()
        for a, b in following.items():
            model.lm_head.weight[b, a] = 10.0
    model.generation_config.eos_token_id = hf.eos_token_id
    prompt = chat.encode_prompt([{"role": "user", "content": "What color is the square?"}])
    assert prompt[-1] == newline
    answer = generate_answer(model, chat, prompt, max_new_tokens=12)
    assert answer == "red"
    # Stopping at eos alone (what a base model's generation config says) runs into the next turns.
    out = model.generate(
        inputs_embeds=model.get_input_embeddings()(prompt)[None],
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=hf.eos_token_id,
        pad_token_id=hf.pad_token_id,
    )
    assert hf.decode(out[0], skip_special_tokens=True).count("red") > 1


# ---------------------------------------------------------------------------------------------------------------
# docs/training.md "From public checkpoints", the command block as written
# ---------------------------------------------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def documented_commands() -> list[str]:
    """The commands of the first bash block under "## From public checkpoints", continuation lines joined,
    comments and blank lines left out."""
    text = DOCS.read_text()
    section = text[text.index("## From public checkpoints") :]
    block = section[section.index("```bash\n") + 8 : section.index("\n```", section.index("```bash\n"))]
    joined = block.replace("\\\n", " ")
    return [
        " ".join(line.split()) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]


def test_the_documented_commands_run_as_written(tmp_path):
    """Every command of the block runs in a project folder laid out as the block expects, with only paths
    and sizes changed: the downloads are a Hugging Face cache holding small checkpoints in the published
    formats under the block's Hub ids (``hf download`` itself runs, offline, and finds them there; the
    dataset's ``--local-dir`` download is the folder made here), ``<subset>`` is named, 8 processes are 2
    and each training command gets ``train.max_steps=2``. Nothing else is added: the paper recipes'
    precision, parallelism, resolution schedule and LLM modes run as they are."""
    import os
    import shutil
    import subprocess
    import sys

    commands = documented_commands()
    assert any(c.startswith("hf download") for c in commands) and any("train-mllm" in c for c in commands)
    project = tmp_path / "project"
    project.mkdir()
    (project / "recipes").symlink_to(RECIPES.parent)  # the repository root's recipes/ (a link there too)

    # the downloads: the Hub ids the block names, in a cache laid out as `hf download` leaves it
    cache, art = tmp_path / "hf-cache", tmp_path / "artifacts"
    corpus = ["What color is the square? " + " ".join(pc.COLOURS) + " a photo"] * 20
    siglip = pc.open_clip_siglip(art / "siglip", VISION)
    pc.hub_cache_entry(cache, "timm/ViT-gopt-16-SigLIP2-384", siglip.parent)
    pc.hub_cache_entry(cache, "Qwen/Qwen2.5-0.5B", pc.qwen2_llm(art / "qwen-0.5b", corpus, LLM_A))
    pc.hub_cache_entry(cache, "Qwen/Qwen-Image", pc.qwen_image_vae(art / "vae", base_dim=16), subfolder="vae")
    pc.hub_cache_entry(
        cache, "Qwen/Qwen2.5-7B-Instruct", pc.qwen2_llm(art / "qwen-7b", corpus, LLM_B, instruct=True, seed=1)
    )
    # the data: LLaVA-OneVision-style Parquet (data/ov/<subset>), LLaVA JSONL, an image folder, photos
    data = pc.colour_square_qa(
        project / "data", 8, sizes=[(96, 144), (150, 100), (64, 64), (200, 120)], square=(10, 40), resize="224x32"
    )
    (project / "data" / "ov" / "tiny").mkdir(parents=True)
    data["parquet"].rename(project / "data" / "ov" / "tiny" / "ov.parquet")
    for name in ("val.jsonl", "mllm.jsonl", "test.jsonl"):
        shutil.copy(data["jsonl"], project / "data" / name)
    shutil.copytree(data["folder"], project / "photos")

    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    for command in commands:
        run = command.replace("<subset>", "tiny").replace("--nproc_per_node 8", "--nproc_per_node 2")
        if " --local-dir " in run:  # a download into a folder: that folder is the one made above
            target = run.split(" --local-dir ")[1].split()[0]
            assert (project / target).is_dir() and any((project / target).iterdir()), target
            continue
        if " viq train" in run or " viq train-mllm" in run:
            run += " train.max_steps=2"
        done = subprocess.run(["bash", "-c", run], cwd=project, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{run}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"

    for stage in ("stage1", "stage2_1", "stage2_2", "drawer", "mllm"):
        assert (project / "runs" / "paper" / stage / "final" / "stage.json").is_file(), stage
    assert len(list((project / "recon").glob("*.png"))) == 8
    assert (project / "codes.store" / "store.json").is_file()
