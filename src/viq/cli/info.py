"""``viq info`` (describe a ``.viq`` file or a model directory) and ``viq convert`` (official release ->
viq format)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from viq.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    CLIError,
    HelpFormatter,
    levels_arg,
    log,
    official_kwargs,
    positive_int,
    reason,
    torch_dtype,
)

# ============================================================================================ info


def _codes_info(path: Path) -> dict[str, Any]:
    from viq.formats.codes import Codes, CodesFormatError

    try:
        codes = Codes.load(path)
    except CodesFormatError as e:
        raise CLIError(str(e), EXIT_FAILED) from None
    except OSError as e:
        raise CLIError(f"{path}: cannot read: {e.strerror or e}", EXIT_FAILED) from None
    size = path.stat().st_size
    h, w = codes.grid
    payload_bits = codes.num_codes * codes.bits_per_code
    if codes.image_size is not None:
        pixels, basis = codes.image_size[0] * codes.image_size[1], "image"
    else:
        pixels, basis = h * w * codes.patch_size**2, "padded"
    return {
        "type": "codes",
        "path": str(path),
        "file_size": size,
        "levels": list(codes.levels),
        "codebook_size": codes.codebook_size,
        "bits_per_code": codes.bits_per_code,
        "codes_per_patch": codes.codes_per_patch,
        "patch_size": codes.patch_size,
        "grid": [h, w],
        "num_codes": codes.num_codes,
        "image_size": None if codes.image_size is None else list(codes.image_size),
        "padded_size": [h * codes.patch_size, w * codes.patch_size],
        "payload_bytes": (payload_bits + 7) // 8,
        "bpp_basis": basis,
        "bpp_file": size * 8 / pixels,
        "bpp_payload": payload_bits / pixels,
        "metadata": codes.metadata,
    }


def _local_model(location: str) -> Path:
    """A model argument as a local directory (Hub ids are fetched or found in the cache)."""
    from viq.model.hub import HubError, resolve_model

    try:
        return resolve_model(location)
    except HubError as e:
        raise CLIError(str(e)) from None


def _model_info(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    from viq.model.inspect import describe_model

    path = _local_model(args.path)
    official = official_kwargs(args)
    if official and (path / "model.safetensors").is_file():
        raise CLIError(f"{path}: --num-heads/--levels only apply to official model directories")
    try:
        return describe_model(path, **official)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None
    except Exception as e:
        log.debug("reading %s failed", path, exc_info=True)
        raise CLIError(f"cannot read model {path}: {reason(e, path)}") from None


def _human(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _print_table(rows: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows) + 1
    for key, value in rows:
        print(f"{key + ':':<{width}} {value}")


def cmd_info(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.is_file():
        info = _codes_info(path)
    else:
        info = _model_info(path, args)
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    if info["type"] == "codes":
        h, w = info["grid"]
        image = "unknown" if info["image_size"] is None else "{} x {}".format(*info["image_size"])
        meta = json.dumps(info["metadata"], ensure_ascii=False) if info["metadata"] else "{}"
        _print_table(
            [
                ("file", f"{info['path']} ({info['file_size']} bytes)"),
                ("levels", ",".join(map(str, info["levels"]))),
                ("codebook size", info["codebook_size"]),
                ("bits per code", info["bits_per_code"]),
                ("grid", f"{h} x {w} patches of {info['patch_size']} px"),
                ("codes", f"{info['num_codes']} ({info['codes_per_patch']} per patch)"),
                ("image size", f"{image} (h x w; padded {info['padded_size'][0]} x {info['padded_size'][1]})"),
                (
                    "bits per pixel",
                    f"{info['bpp_file']:.4f} (file), {info['bpp_payload']:.4f} (payload)"
                    + ("" if info["bpp_basis"] == "image" else " over the padded canvas"),
                ),
                ("metadata", meta),
            ]
        )
    else:
        params = ", ".join(f"{c} {_human(n)}" for c, n in info["parameters"].items())
        _print_table(
            [
                ("model", f"{info['path']} ({info['format']} format)"),
                ("name", info["name"]),
                ("width", info["width"]),
                ("depth", info["depth"]),
                ("heads", info["num_heads"]),
                ("patch size", info["patch_size"]),
                ("levels", ",".join(map(str, info["levels"]))),
                (
                    "codebook size",
                    f"{info['codebook_size']} ({info['bits_per_code']} bits/code, "
                    f"{info['codes_per_patch']} codes/patch)",
                ),
                ("components", ", ".join(info["components"])),
                ("parameters", f"{_human(info['total_parameters'])} ({params})"),
                ("fingerprint", info["fingerprint"] or "unknown"),
            ]
        )
    return EXIT_OK


# ============================================================================================ convert


def cmd_convert(args: argparse.Namespace) -> int:
    from viq.model.official import is_official_dir, load_official

    src, out = _local_model(args.official_dir), Path(args.out_dir)
    if not is_official_dir(src):
        raise CLIError(f"{src}: not an official ViQ directory (expected one model_viq_fsq_<size>.pth)")
    if out.exists():
        if not out.is_dir():
            raise CLIError(f"{out}: exists and is not a folder", EXIT_FAILED)
        if out.resolve() == src.resolve():
            raise CLIError(f"{out}: output folder is the input folder", EXIT_FAILED)
        if any(out.iterdir()) and not args.overwrite:
            raise CLIError(f"{out}: folder exists and is not empty (use --overwrite to write into it)", EXIT_FAILED)
    log.info("loading %s", src)
    try:
        model = load_official(src, dtype=torch_dtype(args.dtype), **official_kwargs(args))
    except Exception as e:
        log.debug("loading failed", exc_info=True)
        raise CLIError(f"cannot load official model {src}: {reason(e, src)}") from None
    try:
        model.save_pretrained(out)
    except OSError as e:
        raise CLIError(f"{out}: cannot write: {e}", EXIT_FAILED) from None
    print(out)
    print(f"components: {', '.join(model.components)}")
    print(f"fingerprint: {model.fingerprint()}")
    return EXIT_OK


# ============================================================================================ parser


_EPILOG_INFO = """\
examples:
  viq info cat.viq
  viq info cat.viq --json | jq .bpp_file
  viq info weights/converted_16k
  viq info owner/name                      # a Hugging Face Hub repository (owner/name@revision/subfolder)
"""

_EPILOG_CONVERT = """\
examples:
  viq convert weights/converted_16k weights/viq-16k
  viq convert my_release/ out/ --num-heads 12 --levels 8,8,8,6,5

float32 (the default) stores the official bfloat16/float32 weights exactly.
"""


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``info`` and ``convert``."""
    p = sub.add_parser(
        "info",
        parents=[common],
        help="describe a .viq file or a model directory",
        description="Describe a .viq file (levels, grid, bits per pixel, metadata) or a model "
        "directory (architecture, components, parameters, fingerprint).",
        epilog=_EPILOG_INFO,
        formatter_class=HelpFormatter,
    )
    p.add_argument("path", metavar="PATH", help=".viq file, model directory or Hub id owner/name")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--num-heads", type=positive_int, metavar="N", help="official directories with a non-official width only"
    )
    p.add_argument("--levels", type=levels_arg, metavar="L,L,...", help="official directories only: FSQ levels")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "convert",
        parents=[common],
        help="official release directory -> viq format",
        description="Convert an official ViQ release (model_viq_fsq_<size>.pth [+ embedder.pth, "
        "index_drawer.pth]) into a viq directory (config.json + model.safetensors).",
        epilog=_EPILOG_CONVERT,
        formatter_class=HelpFormatter,
    )
    p.add_argument("official_dir", metavar="OFFICIAL_DIR", help="official release directory")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output directory")
    p.add_argument(
        "--num-heads", type=positive_int, metavar="N", help="attention heads of the trunk (non-official widths only)"
    )
    p.add_argument(
        "--levels", type=levels_arg, metavar="L,L,...", help="FSQ levels, e.g. 8,8,8,6,5, when they cannot be detected"
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="stored weight dtype (default: float32, lossless)",
    )
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")
    p.set_defaults(func=cmd_convert)
