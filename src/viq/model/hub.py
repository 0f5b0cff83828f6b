"""Hugging Face Hub ids wherever viq takes a model or LLM location, and the model card / upload.

One resolution rule for every entry point (``viq.load``, ``ViQModel.from_pretrained``, the CLI's
``MODEL`` arguments, ``viq info`` / ``viq convert``, recipe ``model.init: viq:<id>`` /
``hf-siglip:<id>`` and ``llm.path``):

1. a local path that exists is used as it is, always;
2. otherwise ``owner/name``, optionally ``owner/name@revision`` and ``owner/name[@revision]/sub/folder``
   (as ``huggingface_hub.HfFileSystem`` spells them), is a Hub repository: it is fetched with
   :func:`huggingface_hub.snapshot_download` into the Hugging Face cache, or found there;
3. anything else is returned unchanged, so the caller's own "not found" error names it.

The cache and offline switches are the Hugging Face ones, read when a location is resolved (not when
``huggingface_hub`` was imported, so a process may set them late): ``HF_HUB_CACHE`` (else
``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``) and
``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``). Offline, or with ``local_files_only=True``, a
repository that is not cached is a :class:`HubNotCachedError` naming the repository, the cache and the
command that downloads it.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "HubRef",
    "HubError",
    "HubNotCachedError",
    "parse_hub_id",
    "resolve",
    "resolve_model",
    "hub_cache_dir",
    "hub_offline",
    "model_card",
    "push_to_hub",
    "MODEL_FILES",
    "CARD_NAME",
]

#: What a viq model repository needs: viq format, or the official release files.
MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "model_viq_fsq_*.pth",
    "embedder.pth",
    "index_drawer.pth",
    "README.md",
)
#: Files of other frameworks never needed to load an LLM or SigLIP checkpoint with transformers.
FOREIGN_FILES = (
    "*.msgpack",
    "*.h5",
    "*.ot",
    "*.onnx",
    "*.tflite",
    "tf_model*",
    "flax_model*",
    "rust_model*",
    "onnx/*",
    "openvino/*",
    "coreml/*",
)
CARD_NAME = "README.md"
#: The first line of the card body: a README without it was written by someone else and is kept.
_CARD_MARK = "<!-- model card written by viq (ViQModel.save_pretrained) -->"

# Hub repo names: letters, digits, '-', '_', '.', no '--' or '..', at most 96 characters (as the Hub).
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev>[A-Za-z0-9._-]+))?(?:/(?P<sub>[^@]+))?")


class HubError(FileNotFoundError):
    """A Hub location that cannot be had (no such repository or revision, not cached offline, ...)."""


class HubNotCachedError(HubError):
    """Offline (``HF_HUB_OFFLINE=1`` / ``local_files_only``) and the repository is not in the cache."""


@dataclass(frozen=True)
class HubRef:
    """A Hub location: repository, revision (None = the default branch) and folder inside it."""

    repo_id: str
    revision: str | None = None
    subfolder: str | None = None

    def __str__(self) -> str:
        return (
            self.repo_id
            + (f"@{self.revision}" if self.revision else "")
            + (f"/{self.subfolder}" if self.subfolder else "")
        )


def parse_hub_id(text: str | os.PathLike) -> HubRef | None:
    """``owner/name[@revision][/sub/folder]`` -> :class:`HubRef`; None for anything else (absolute or
    ``./`` paths, one-part names, names the Hub would refuse). Existence on disk is not checked here."""
    text = os.fspath(text)
    m = _HUB_ID.fullmatch(text)
    if m is None or ".." in m["repo"] or "--" in m["repo"]:
        return None
    sub = m["sub"].strip("/") if m["sub"] else None
    if sub is not None and any(part in ("", ".", "..") for part in sub.split("/")):
        return None
    return HubRef(m["repo"], m["rev"], sub)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment as it is now (same precedence as huggingface_hub)."""
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(os.path.expanduser(explicit)))
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", os.path.join("~", ".cache")), "huggingface")
    return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set to a true value, as of now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _download_command(ref: HubRef, cache: Path) -> str:
    """The shell command that puts ``ref`` into ``cache`` (huggingface_hub's own CLI)."""
    return (
        f"hf download {ref.repo_id}" + (f" --revision {ref.revision}" if ref.revision else "") + f" --cache-dir {cache}"
    )


def resolve(
    location: str | os.PathLike,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    allow_patterns: tuple[str, ...] | None = None,
    ignore_patterns: tuple[str, ...] | None = FOREIGN_FILES,
    local_files_only: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    what: str = "model",
) -> Path:
    """A local directory for ``location`` (see the module docstring for the rule).

    Args:
        location: a local path, or a Hub id ``owner/name[@revision][/sub/folder]``.
        revision: branch, tag or commit (overrides one written in ``location``); Hub ids only.
        subfolder: folder inside the repository (or inside a local directory).
        allow_patterns, ignore_patterns: which files of the repository to fetch (relative to the
            subfolder); default: everything but other frameworks' weights.
        local_files_only: never go to the network (default: the ``HF_HUB_OFFLINE`` switch).
        cache_dir: the Hugging Face cache (default: :func:`hub_cache_dir`).
        what: how the error messages name the thing ("model", "LLM", ...).

    Raises:
        HubNotCachedError: offline (or ``local_files_only``) and not in the cache.
        HubError: no such repository, revision or folder, or the download failed.
    """
    path = Path(location)
    if path.exists():
        if revision is not None:
            raise ValueError(f"{path}: revision={revision!r} applies to Hub ids, and this is a local path")
        return path / subfolder if subfolder else path
    ref = parse_hub_id(location)
    if ref is None:
        return path / subfolder if subfolder else path
    ref = HubRef(ref.repo_id, revision or ref.revision, "/".join(p for p in (ref.subfolder, subfolder) if p) or None)
    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    offline = hub_offline() if local_files_only is None else local_files_only
    prefix = f"{ref.subfolder}/" if ref.subfolder else ""
    allow = None if allow_patterns is None else [prefix + p for p in allow_patterns]
    if allow is None and prefix:
        allow = [prefix + "*"]
    ignore = None if ignore_patterns is None else [prefix + p for p in ignore_patterns]

    import huggingface_hub
    from huggingface_hub import errors

    where = f"{location}: no such local path; as a Hugging Face Hub {what} ({ref})"
    try:
        snapshot = huggingface_hub.snapshot_download(
            ref.repo_id,
            revision=ref.revision,
            cache_dir=cache,
            local_files_only=offline,
            allow_patterns=allow,
            ignore_patterns=ignore,
        )
    except errors.RevisionNotFoundError:
        raise HubError(f"{where}: the repository has no revision {ref.revision!r}") from None
    except errors.LocalEntryNotFoundError as e:  # includes IncompleteSnapshotError
        why = "downloads are off (HF_HUB_OFFLINE=1)" if offline else f"the Hub cannot be reached ({_first_line(e)})"
        raise HubNotCachedError(
            f"{where}: not in the Hugging Face cache {cache}, and {why}. Download it where there is network "
            f"with `{_download_command(ref, cache)}` (or "
            f"`huggingface-cli download ...` with older huggingface_hub), then run again"
        ) from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
        raise HubError(
            f"{where}: no such repository, or it is private or gated (log in with `hf auth login`): {_first_line(e)}"
        ) from None
    except (errors.HfHubHTTPError, errors.HFValidationError, OSError) as e:
        raise HubError(f"{where}: {type(e).__name__}: {_first_line(e)}") from None
    out = Path(snapshot) / ref.subfolder if ref.subfolder else Path(snapshot)
    if not out.is_dir():
        raise HubError(f"{where}: the repository has no folder {ref.subfolder!r}")
    return out


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _is_model_dir(directory: Path) -> bool:
    return (directory / "model.safetensors").is_file() or any(directory.glob("model_viq_fsq_*.pth"))


def resolve_model(
    location: str | os.PathLike, *, revision: str | None = None, subfolder: str | None = None, **kwargs: Any
) -> Path:
    """:func:`resolve` for viq model repositories: only the model files are fetched (viq format or the
    official release), and a cached snapshot without them is an error that says how to fetch them."""
    local = Path(location).exists()
    directory = resolve(
        location, revision=revision, subfolder=subfolder, allow_patterns=MODEL_FILES, ignore_patterns=None, **kwargs
    )
    if not local and parse_hub_id(location) is not None and not _is_model_dir(directory):
        ref = parse_hub_id(location)
        cache = Path(kwargs.get("cache_dir") or hub_cache_dir())
        raise HubNotCachedError(
            f"{location}: the cached Hub snapshot {directory} has neither config.json + model.safetensors (viq "
            f"format) nor model_viq_fsq_<size>.pth (official format); fetch them with "
            f"`{_download_command(HubRef(ref.repo_id, revision or ref.revision), cache)}`"
        )
    return directory


# ============================================================================================ card, upload


def model_card(model: Any, repo_id: str | None = None) -> str:
    """The ``README.md`` of a saved model: YAML front matter for the Hub (``library_name: viq``, tags),
    then what the codes are (levels, codebook size, bits), the fingerprint and how to load it."""
    from viq.formats.bits import bits_for_levels

    cfg = model.config
    head, enc = cfg.head, cfg.encoder
    try:
        fingerprint = model.fingerprint()
    except RuntimeError:
        fingerprint = "unknown (saved without the encoder)"
    size = head.codebook_size
    tag = f"{size // 1024}k" if size % 1024 == 0 else str(size)
    repo = repo_id or "<owner>/<name>"
    params = sum(p.numel() for p in model.parameters())
    return "\n".join(
        [
            "---",
            "library_name: viq",
            "tags:",
            "- viq",
            "- image-tokenizer",
            "- fsq",
            "- discrete-visual-tokens",
            f"- codebook-{tag}",
            "pipeline_tag: image-feature-extraction",
            "---",
            _CARD_MARK,
            "",
            f"# {cfg.name}",
            "",
            "A ViQ image tokenizer (*ViQ: Text-Aligned Visual Quantized Representations at Any Resolution*): "
            f"images at their native resolution -> {head.codes_per_patch} discrete codes per "
            f"{enc.patch_size}x{enc.patch_size} patch -> LLM features, VAE latents or pixels.",
            "",
            "| | |",
            "|---|---|",
            f"| codebook size | {size} |",
            f"| {'FSQ levels' if head.quantizer == 'fsq' else 'code levels (' + head.quantizer + ')'} | "
            f"{', '.join(map(str, head.code_levels))} |",
            f"| bits per code | {bits_for_levels(head.code_levels) if head.codebook_size else 0} |",
            f"| codes per patch | {head.codes_per_patch} |",
            f"| trunk | width {enc.width}, depth {enc.depth}, {enc.num_heads} heads |",
            f"| components | {', '.join(model.components)} |",
            f"| parameters | {params:,} |",
            f"| code-space fingerprint | `{fingerprint}` |",
            "",
            "Two models with the same fingerprint produce the same codes; `viq encode` writes it into every "
            "`.viq` file.",
            "",
            "## Use",
            "",
            "```bash",
            "pip install viq",
            f"viq info {repo}",
            f"viq encode {repo} photos/ -r -o codes/",
            "```",
            "",
            "```python",
            "import torch, viq",
            f'model = viq.load("{repo}", dtype=torch.bfloat16)   # revision=..., subfolder=... as needed',
            'codes = model.encode(["photo.jpg"])',
            "```",
            "",
        ]
    )


def write_model_card(model: Any, directory: str | os.PathLike, repo_id: str | None = None) -> bool:
    """Write :func:`model_card` to ``directory/README.md`` unless a README not written by viq is there
    (someone's own card is never overwritten). Returns whether it was written."""
    from viq._io import atomic_write

    path = Path(directory) / CARD_NAME
    if path.is_file() and _CARD_MARK not in path.read_text(errors="replace"):
        return False
    text = model_card(model, repo_id)
    atomic_write(path, lambda p: Path(p).write_text(text))
    return True


def push_to_hub(
    model: Any,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload ViQ model",
    create_pr: bool = False,
) -> str:
    """Save ``model`` (weights, config, card) to a temporary folder and upload it to ``repo_id``
    (created if needed) with :class:`huggingface_hub.HfApi`. Returns the commit URL."""
    from huggingface_hub import HfApi

    if parse_hub_id(repo_id) is None or parse_hub_id(repo_id).subfolder or parse_hub_id(repo_id).revision:
        raise ValueError(f"{repo_id!r}: expected a Hub repository id owner/name")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="viq-upload-") as tmp:
        model.save_pretrained(tmp, repo_id=repo_id)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            repo_type="model",
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
        )
    return str(getattr(info, "commit_url", info))
