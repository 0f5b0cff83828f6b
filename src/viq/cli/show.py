"""``viq show``: one self-contained HTML page of what a tokenizer keeps and loses, per image and for its
codebook (:mod:`viq.eval.show` does the work)."""

from __future__ import annotations

import argparse
from pathlib import Path

from viq.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    CLIError,
    FileRun,
    HelpFormatter,
    add_model_options,
    add_preprocess_options,
    list_images,
    load_model,
    log,
    open_store,
    positive_int,
    preprocess_config,
    progress_bar,
    reason,
    write_output,
)

_EPILOG = """examples:
  viq show weights/viq-16k photos/ -o page.html              every image under photos/
  viq show weights/viq-16k a.jpg b.png -o page.html --lossless
  viq show runs/stage2_2/final codes.store -o page.html --limit 100   stored codes: reconstructions and code maps

The page embeds everything (open it offline, send it as one file). PSNR / SSIM / bpp are the numbers
viq eval-recon gives for the same images.
"""


def _is_store(path: Path) -> bool:
    from viq.store.format import STORE_FILE

    return path.is_dir() and (path / STORE_FILE).is_file()


def cmd_show(args: argparse.Namespace) -> int:
    from viq.eval.show import render_page, show_images

    run = FileRun()
    stores = [Path(p) for p in args.inputs if _is_store(Path(p))]
    if stores and len(args.inputs) > 1:
        raise CLIError("give either one code store or image files / folders, not both")
    model = load_model(args, ("encoder", "drawer", "vae"))
    cfg = preprocess_config(args, model.patch_size)
    if stores:
        store = open_store(str(stores[0]))
        n = min(len(store), args.limit or len(store))
        items = ((store.id_at(i), store.get_at(i)) for i in range(n))
        title = f"viq show: {stores[0]}"
    else:
        files = list_images(args.inputs, run)
        if args.limit:
            files = files[: args.limit]
        n, items, title = len(files), [str(f) for f in files], "viq show"
    log.info("%d image(s) to show with %s", n, args.model)
    bar = progress_bar(n, "show", args.quiet)
    try:
        views = show_images(
            model,
            items,
            preprocess=cfg,
            thumb=args.thumb,
            lossless=args.lossless,
            on_error=lambda source, e: run.fail(source, reason(e, source)),
            progress=bar.update,
        )
    finally:
        bar.close()
    if not views:
        if run.failures:
            log.error("%d file(s) failed:%s", len(run.failures), "".join(f"\n  {s}: {w}" for s, w in run.failures))
        raise CLIError("no images to show", EXIT_FAILED)
    page = render_page(
        views,
        title=title,
        model_name=str(args.model),
        thumb=args.thumb,
        top_codes=args.top_codes,
        gallery=args.gallery,
        preprocess=cfg,
    )
    write_output(Path(args.output), page.encode(), "page")
    log.info("wrote %s (%d image(s), %.1f MB)", args.output, len(views), len(page) / 1e6)
    if run.failures:
        log.error("%d file(s) failed:%s", len(run.failures), "".join(f"\n  {s}: {w}" for s, w in run.failures))
        return EXIT_FAILED
    return EXIT_OK


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``show``."""
    p = sub.add_parser(
        "show",
        parents=[common],
        help="an HTML page: reconstructions, error maps, code maps, codebook",
        description="Encode and reconstruct images with a model and write one self-contained HTML "
        "page: per image the input, the reconstruction, an error heat map, PSNR / SSIM / "
        "bpp and the code maps (hover names a code); then codebook usage, entropy and "
        "dead codes per head and the most used codes with the patches that receive them.",
        epilog=_EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="model directory (or Hub id) with the encoder, drawer and vae")
    p.add_argument(
        "inputs",
        metavar="IMAGES",
        nargs="+",
        help="image files and/or folders (searched recursively), or one code store",
    )
    p.add_argument("-o", "--output", required=True, metavar="PAGE.html", help="the page to write")
    p.add_argument("--limit", type=positive_int, metavar="N", help="only the first N images (or store records)")
    p.add_argument(
        "--thumb",
        type=positive_int,
        default=256,
        metavar="PX",
        help="longest side of the embedded pictures (default 256)",
    )
    p.add_argument("--lossless", action="store_true", help="embed pictures as PNG (default WebP quality 90: smaller)")
    p.add_argument(
        "--top-codes", type=positive_int, default=16, metavar="N", help="most used codes listed (default 16)"
    )
    p.add_argument(
        "--gallery", type=int, default=8, metavar="N", help="patches shown per listed code (default 8; 0: none)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_preprocess_options(p)
    add_model_options(p)
    p.set_defaults(func=cmd_show)
