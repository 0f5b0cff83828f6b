"""Describe a model directory (viq or official format) from its config and tensor shapes, without
building the model: architecture, components, parameter counts and the code-space fingerprint.

Used by ``viq info``; cheap even for the giant releases (safetensors headers are read, official
``.pth`` files are memory-mapped).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from viq.formats.bits import bits_for_levels
from viq.model.config import ViQConfig
from viq.model.fingerprint import code_fingerprint
from viq.model.official import (
    detect_config,
    find_official_files,
    is_official_dir,
    load_official_state_dicts,
    map_official_state_dicts,
)
from viq.model.viq import COMPONENTS, CONFIG_NAME, WEIGHTS_NAME

__all__ = ["describe_model"]


def _component_of(key: str) -> str:
    prefix = key.split(".", 1)[0]
    return "encoder" if prefix == "head" else prefix


def describe_model(path: str | os.PathLike, **official_kwargs: Any) -> dict[str, Any]:
    """A JSON-able description of the model directory ``path``.

    ``official_kwargs`` (``num_heads``, ``levels``) apply to official directories only (see
    :func:`viq.model.official.detect_config`). Raises FileNotFoundError when ``path`` is no model
    directory, ValueError (naming the file) when a file cannot be read or the options do not apply.
    """
    path = Path(path)
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if weights_path.is_file():
        if official_kwargs:
            raise ValueError(f"{path}: {sorted(official_kwargs)} only apply to official model directories")
        from safetensors import safe_open

        fmt = "viq"
        config = ViQConfig.load(config_path)
        with safe_open(str(weights_path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            fingerprint = (f.metadata() or {}).get("fingerprint")
            if "head.project_in.weight" in shapes:
                fingerprint = code_fingerprint(
                    config, f.get_tensor("head.project_in.weight"), f.get_tensor("head.project_in.bias")
                )
    elif is_official_dir(path):
        fmt = "official"
        files = find_official_files(path)
        states = load_official_state_dicts(path)  # memory-mapped: cheap even for the giant models
        tag = files["encoder"].name[len("model_viq_fsq_") : -len(".pth")]
        config = detect_config(states, size_tag=tag, source=str(path), **official_kwargs)
        state, _ = map_official_state_dicts(states, config, source=str(path))
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        fingerprint = code_fingerprint(config, state["head.project_in.weight"], state["head.project_in.bias"])
    elif not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    else:
        raise FileNotFoundError(
            f"{path}: neither a viq model directory ({CONFIG_NAME} + {WEIGHTS_NAME}) nor an "
            f"official ViQ directory (model_viq_fsq_<size>.pth)"
        )

    params: dict[str, int] = {}
    for key, shape in shapes.items():
        component = _component_of(key)
        params[component] = params.get(component, 0) + math.prod(shape)
    components = [c for c in COMPONENTS if c in params]
    enc, head = config.encoder, config.head
    return {
        "type": "model",
        "path": str(path),
        "format": fmt,
        "name": config.name,
        "width": enc.width,
        "depth": enc.depth,
        "num_heads": enc.num_heads,
        "patch_size": enc.patch_size,
        "quantizer": head.quantizer,
        "levels": list(head.code_levels),
        "codebook_size": head.codebook_size,
        "bits_per_code": bits_for_levels(head.code_levels) if head.codebook_size else 0,
        "codes_per_patch": head.codes_per_patch,
        "components": components,
        "parameters": {c: params[c] for c in components},
        "total_parameters": sum(params[c] for c in components),
        "fingerprint": fingerprint,
        "config": config.to_dict(),
    }
