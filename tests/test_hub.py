"""Hub ids (``owner/name[@revision][/subfolder]``) resolved offline from a Hugging Face cache built on disk.

No network: each test writes the cache's real layout (``models--owner--name/{blobs, snapshots/<commit>,
refs/<revision>}``, snapshot files as links to content-addressed blobs) under ``tmp_path`` and sets
``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` to it. ``push_to_hub`` runs against a stub ``HfApi``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

import viq
from viq import ViQModel
from viq.cli.main import main
from viq.model import hub

OFFICIAL_FILES = ("model_viq_fsq_16k.pth", "embedder.pth", "index_drawer.pth", "config.json", "README.md")


def commit_hash(label: str) -> str:
    return hashlib.sha1(label.encode()).hexdigest()


def cache_repo(
    cache: Path, repo_id: str, files: dict[str, Path], *, commit: str, refs: tuple[str, ...] = ("main",)
) -> Path:
    """Put ``files`` (path in the repository -> local file) into ``cache`` as huggingface_hub does:
    blobs named by content hash, the snapshot's files linking to them, ``refs/<ref>`` holding the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blobs, snapshot = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        data = Path(src).read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.symlink_to(os.path.relpath(blob, target.parent))
        except OSError:  # no symlinks here (huggingface_hub then copies too)
            shutil.copyfile(blob, target)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def folder_files(directory: Path, prefix: str = "") -> dict[str, Path]:
    return {prefix + f.name: f for f in sorted(directory.iterdir()) if f.is_file()}


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, offline; the working directory holds no ``owner/`` folder (a local path wins)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache


@pytest.fixture(scope="module")
def viq_dirs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny viq-format models (different seeds, so different fingerprints), saved with save_pretrained."""
    root = tmp_path_factory.mktemp("viq-models")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        model = ViQModel.from_config("viq-test", seed=seed)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def info_json(capsys, location: str, *extra: str) -> dict:
    capsys.readouterr()
    assert main(["info", location, "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


# ============================================================================================ viq format


def test_viq_repo_matches_local_directory(cache, viq_dirs, capsys):
    snapshot = cache_repo(cache, "owner/tiny", folder_files(viq_dirs["a"]), commit=commit_hash("a"))
    local = viq.load(viq_dirs["a"])
    expected = local.fingerprint()

    from_hub = viq.load("owner/tiny")
    assert from_hub.fingerprint() == expected
    assert ViQModel.from_pretrained("owner/tiny").fingerprint() == expected
    assert hub.resolve_model("owner/tiny") == snapshot

    info_hub, info_local = info_json(capsys, "owner/tiny"), info_json(capsys, str(viq_dirs["a"]))
    assert info_hub["fingerprint"] == info_local["fingerprint"] == expected
    assert info_hub["format"] == "viq" and Path(info_hub["path"]) == snapshot
    assert {k: v for k, v in info_hub.items() if k != "path"} == {k: v for k, v in info_local.items() if k != "path"}

    # the table form names the fingerprint too
    assert main(["info", "owner/tiny"]) == 0
    assert expected in capsys.readouterr().out


def test_revision_and_subfolder(cache, viq_dirs, capsys):
    a, b = commit_hash("a"), commit_hash("b")
    cache_repo(cache, "owner/tiny", folder_files(viq_dirs["a"]), commit=a)
    cache_repo(
        cache,
        "owner/tiny",
        {**folder_files(viq_dirs["b"]), **folder_files(viq_dirs["a"], "sub/dir/")},
        commit=b,
        refs=("v2",),
    )
    fa, fb = viq.load(viq_dirs["a"]).fingerprint(), viq.load(viq_dirs["b"]).fingerprint()
    assert fa != fb

    assert viq.load("owner/tiny").fingerprint() == fa  # refs/main
    for location in ("owner/tiny@v2", f"owner/tiny@{b}"):  # a second ref, a commit hash
        assert viq.load(location).fingerprint() == fb
        assert info_json(capsys, location)["fingerprint"] == fb
    assert viq.load("owner/tiny", revision="v2").fingerprint() == fb
    assert ViQModel.from_pretrained("owner/tiny", revision=b).fingerprint() == fb

    # a folder inside the repository, with or without a revision
    assert viq.load("owner/tiny@v2/sub/dir").fingerprint() == fa
    assert viq.load("owner/tiny", revision="v2", subfolder="sub/dir").fingerprint() == fa
    assert info_json(capsys, f"owner/tiny@{b}/sub/dir")["fingerprint"] == fa

    # a revision or folder that is not there
    with pytest.raises(hub.HubError, match="owner/tiny"):
        viq.load("owner/tiny@v3")
    with pytest.raises(hub.HubError, match="owner/tiny"):
        viq.load("owner/tiny@v2/no/such")


def test_local_path_wins(cache, viq_dirs, tmp_path):
    cache_repo(cache, "owner/tiny", folder_files(viq_dirs["b"]), commit=commit_hash("b"))
    shutil.copytree(viq_dirs["a"], Path.cwd() / "owner" / "tiny")
    assert viq.load("owner/tiny").fingerprint() == viq.load(viq_dirs["a"]).fingerprint()


def test_uncached_repo_offline(cache, capsys):
    assert main(["info", "owner/missing"]) == 2
    err = capsys.readouterr().err
    assert "owner/missing" in err and str(cache) in err
    assert "hf download owner/missing" in err and "HF_HUB_OFFLINE" in err
    assert "Traceback" not in err

    with pytest.raises(hub.HubNotCachedError) as exc:
        viq.load("owner/missing@v1")
    msg = str(exc.value)
    assert "owner/missing" in msg and str(cache) in msg and "--revision v1" in msg

    # commands that load a model say the same
    from PIL import Image

    Image.new("RGB", (32, 32)).save(Path.cwd() / "img.png")
    assert main(["encode", "owner/missing", str(Path.cwd() / "img.png"), "-o", str(Path.cwd() / "out")]) == 2
    err = capsys.readouterr().err
    assert "owner/missing" in err and "hf download owner/missing" in err


def test_cached_repo_without_model_files(cache, viq_dirs):
    cache_repo(cache, "owner/cardonly", {"README.md": viq_dirs["a"] / "README.md"}, commit=commit_hash("card"))
    with pytest.raises(hub.HubNotCachedError, match="hf download owner/cardonly"):
        viq.load("owner/cardonly")


# ============================================================================================ official format


def test_official_repo_matches_local_directory(cache, official_dir, capsys):
    files = {name: official_dir / name for name in OFFICIAL_FILES}
    cache_repo(cache, "authors/viq-tiny", files, commit=commit_hash("official"))
    cache_repo(cache, "authors/viq-many", {f"tiny/{n}": p for n, p in files.items()}, commit=commit_hash("many"))
    expected = viq.load(official_dir, num_heads=4).fingerprint()

    assert viq.load("authors/viq-tiny", num_heads=4).fingerprint() == expected
    assert viq.load("authors/viq-many/tiny", num_heads=4).fingerprint() == expected
    info_hub = info_json(capsys, "authors/viq-tiny", "--num-heads", "4")
    info_local = info_json(capsys, str(official_dir), "--num-heads", "4")
    assert info_hub["format"] == "official" and info_hub["fingerprint"] == info_local["fingerprint"] == expected
    assert info_json(capsys, "authors/viq-many/tiny", "--num-heads", "4")["fingerprint"] == expected


# ============================================================================================ card, upload


def test_model_card(viq_dirs):
    model = viq.load(viq_dirs["a"])
    card = (viq_dirs["a"] / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: viq" in front.splitlines()
    assert f"| FSQ levels | {', '.join(map(str, model.config.head.levels))} |" in card
    assert f"| codebook size | {model.config.head.codebook_size} |" in card
    assert model.fingerprint() in card

    named = hub.model_card(model, "owner/tiny")
    assert 'viq.load("owner/tiny"' in named and "viq info owner/tiny" in named


def test_save_pretrained_keeps_a_foreign_readme(viq_dirs, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "README.md").write_text("my own card\n")
    viq.load(viq_dirs["a"]).save_pretrained(out)
    assert (out / "README.md").read_text() == "my own card\n"
    assert (out / "model.safetensors").is_file()


def test_push_to_hub_with_stub_api(viq_dirs, monkeypatch):
    import huggingface_hub

    calls: dict = {}

    class StubApi:
        def __init__(self, token=None, **kwargs):
            calls["token"] = token

        def create_repo(self, repo_id, **kwargs):
            calls["create_repo"] = (repo_id, kwargs)

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            folder = Path(folder_path)
            calls["upload_folder"] = (repo_id, kwargs)
            calls["files"] = {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}

            class Info:
                commit_url = f"https://huggingface.co/{repo_id}/commit/{'0' * 40}"

            return Info()

    monkeypatch.setattr(huggingface_hub, "HfApi", StubApi)
    model = viq.load(viq_dirs["a"])
    url = model.push_to_hub("me/viq-tiny", private=True, token="tok")
    assert url == f"https://huggingface.co/me/viq-tiny/commit/{'0' * 40}"
    assert calls["token"] == "tok"
    assert calls["create_repo"][0] == "me/viq-tiny" and calls["create_repo"][1]["private"] is True
    assert calls["upload_folder"][0] == "me/viq-tiny" and calls["upload_folder"][1]["repo_type"] == "model"
    assert set(calls["files"]) == {"config.json", "model.safetensors", "README.md"}
    card = calls["files"]["README.md"].decode()
    assert "library_name: viq" in card and model.fingerprint() in card and "viq info me/viq-tiny" in card

    # what was uploaded loads back to the same model, through the cache
    for name, data in calls["files"].items():
        (viq_dirs["a"].parent / "uploaded").mkdir(exist_ok=True)
        (viq_dirs["a"].parent / "uploaded" / name).write_bytes(data)
    assert viq.load(viq_dirs["a"].parent / "uploaded").fingerprint() == model.fingerprint()

    for bad in ("me/viq-tiny@v1", "me/viq-tiny/sub", "just-a-name"):
        with pytest.raises(ValueError):
            model.push_to_hub(bad)


# ============================================================================================ llm.path


def test_llm_path_hub_id_from_cache(cache, tmp_path):
    """A recipe's ``llm.path`` may be a Hub id: the tiny Qwen2 model is found in the cache offline."""
    import torch

    from train_helpers import make_llm, recipe
    from viq.train.build import build_model
    from viq.train.config import TrainConfig

    llm_dir = make_llm(tmp_path / "llm")
    cache_repo(cache, "owner/tiny-llm", folder_files(llm_dir), commit=commit_hash("llm"))
    cfg = TrainConfig.from_dict(
        recipe(
            "stage1", tmp_path / "out", tmp_path / "unused.json", None, llm={"path": "owner/tiny-llm", "mode": "frozen"}
        )
    )
    model, tokenizer = build_model(cfg, device=torch.device("cpu"))
    assert model.llm is not None and tokenizer is not None
    local = TrainConfig.from_dict(
        recipe("stage1", tmp_path / "out2", tmp_path / "unused.json", llm_dir, llm={"mode": "frozen"})
    )
    reference, _ = build_model(local, device=torch.device("cpu"))
    ours, theirs = model.llm.state_dict(), reference.llm.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)

    # a run trained with it answers questions: load_run takes the recipe's Hub id as it is
    from train_helpers import make_qa
    from viq.eval.qa import load_run
    from viq.train.engine import train

    run = recipe(
        "stage1",
        tmp_path / "run",
        make_qa(tmp_path / "qa", n=2),
        None,
        llm={"path": "owner/tiny-llm"},
        train={"max_steps": 1, "batch_size": 2, "eval_samples": 0},
    )
    train(TrainConfig.from_dict(run))
    answerer, _ = load_run(tmp_path / "run", "cpu")
    assert answerer.llm is not None

    missing = TrainConfig.from_dict(
        recipe("stage1", tmp_path / "out3", tmp_path / "unused.json", None, llm={"path": "owner/no-llm"})
    )
    with pytest.raises(hub.HubNotCachedError, match="owner/no-llm"):
        build_model(missing, device=torch.device("cpu"))
