"""``viq extract`` (images -> a code store) and ``viq store verify|stats``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from viq.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    CLIError,
    HelpFormatter,
    add_model_options,
    add_preprocess_options,
    load_model,
    log,
    open_store,
    positive_int,
    preprocess_config,
    write_output,
)


def _one(args: argparse.Namespace, name: str, flag: str) -> str:
    """A value given positionally or by its older flag (kept as a hidden alias), not both."""
    positional, old = getattr(args, name), getattr(args, f"{name}_flag")
    if positional is not None and old is not None and positional != old:
        raise CLIError(f"{name.upper()} given twice: {positional!r} and {flag} {old!r}")
    value = positional if positional is not None else old
    if value is None:
        raise CLIError(f"missing {name.upper()} (viq extract MODEL INPUT -o STORE)")
    return value


def cmd_extract(args: argparse.Namespace) -> int:
    from viq.extract import extract
    from viq.launch import resolve_distributed
    from viq.store.format import StoreError

    args.model = _one(args, "model", "--model")
    source = _one(args, "input", "--input")
    if args.out is None:
        raise CLIError("missing the store: -o STORE")
    try:
        launch = resolve_distributed(args.rank, args.world_size)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.device == "auto":  # each rank on its own GPU of the node
        import torch

        args.device = f"cuda:{launch.local_rank}" if torch.cuda.is_available() else "cpu"
    model = load_model(args, ("encoder",))
    preprocess = preprocess_config(args, model.patch_size)
    try:
        counts = extract(
            args.model,
            source,
            args.out,
            model=model,
            image_root=args.image_root,
            image_column=args.image_column,
            id_column=args.id_column,
            rank=launch.rank,
            world_size=launch.world_size,
            device=str(model.device),
            dtype=model.dtype,
            batch_tokens=args.batch_tokens,
            num_workers=args.workers,
            preprocess=preprocess,
            flush_every=args.flush_every,
            entropy_coding=args.entropy_coding,
            progress=not args.quiet,
        )
    except (ValueError, FileNotFoundError, StoreError) as e:
        raise CLIError(str(e), EXIT_FAILED) from None
    log.info(
        "encoded %d, already stored %d, deduplicated %d, failed %d (of %d on this rank)",
        counts["encoded"],
        counts["existing"],
        counts["deduplicated"],
        counts["failed"],
        counts["images"],
    )
    print(json.dumps(counts))
    return EXIT_FAILED if counts["failed"] else EXIT_OK


def _records_bar(store, desc: str, quiet: bool):
    from viq._progress import progress_bar

    # A bar over records (every byte is read); shown only when stderr is a terminal.
    return progress_bar(len(store), desc, show=False if quiet else None, leave=False)


def cmd_store_verify(args: argparse.Namespace) -> int:
    """Exit 0 = sound, 1 = problems found (or damaged derived files rebuilt, unless --repair), 2 = the
    store cannot be opened."""
    store = open_store(args.path)
    with _records_bar(store, "verify", args.quiet) as bar:
        report = store.verify(progress=bar.update)
    print(report.summary())
    if report.repaired and not args.repair:
        log.error(
            "%s: %d damaged index file(s) were rebuilt (listed above); the store is sound now. Something "
            "damaged them: check the disk (--repair: rebuild without failing)",
            args.path,
            len(report.repaired),
        )
        return EXIT_FAILED
    return EXIT_OK if report.ok else EXIT_FAILED


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _write_codebook_page(store, counter, args: argparse.Namespace) -> None:
    """The codebook part of ``viq show``'s page for every record of the store (``counter``: the per-head
    histograms, counted in the statistics' pass), written atomically to ``--page``."""
    from viq.eval.show import render_codebook_page

    page = render_codebook_page(
        counter,
        title=f"codebook of {store.path}",
        note=f"Every record of the store. Patch galleries need the images: viq show MODEL {args.path} -o PAGE.html",
    )
    write_output(Path(args.page), page.encode(), "page")


def cmd_store_stats(args: argparse.Namespace) -> int:
    from viq.eval.codebook import CodebookCounter
    from viq.store.check import plot_stats
    from viq.store.format import StoreError

    store = open_store(args.path)
    # --page: the per-head histograms are counted in the same pass over the records
    counter = CodebookCounter(store.levels, store.codes_per_patch) if args.page else None
    try:
        with _records_bar(store, "stats", args.quiet) as bar:
            stats = store.stats(progress=bar.update, each=counter.add_indices if counter is not None else None)
    except StoreError as e:  # a record that does not decode
        raise CLIError(f"{e} (viq store verify {args.path} lists every problem)", EXIT_FAILED) from None
    if args.plot:
        try:
            plot_stats(stats, args.plot)
        except ImportError as e:
            raise CLIError(f"--plot needs matplotlib (pip install matplotlib): {e}", EXIT_FAILED) from None
    if counter is not None:
        _write_codebook_page(store, counter, args)
    if args.json:
        print(json.dumps({k: v for k, v in stats.items() if k != "histogram"}, indent=2))
        return EXIT_OK
    lines = [
        f"store:       {store.path}",
        (
            f"codes:       levels {tuple(stats['levels'])}, K = {stats['codebook_size']}, "
            f"{stats['bits_per_code']} bits/code, {'lzma' if stats['entropy_coding'] else 'packed'} records"
        ),
        (
            f"images:      {stats['images']} in {stats['shards']} shard(s), {stats['total_codes']} codes, "
            f"{stats['pixels']} pixels"
        ),
        f"size:        {stats['store_bytes']} bytes on disk, {stats['payload_bytes']} bytes of payload",
        (
            f"bits/pixel:  {_fmt(stats['bpp'], '.4f')} (store), {_fmt(stats['bpp_payload'], '.4f')} (payload), "
            f"{_fmt(stats['bpp_payload_padded'], '.4f')} (payload per padded pixel)"
        ),
        (
            f"bits/code:   {_fmt(stats['payload_bits_per_code'], '.3f')} stored, "
            f"{_fmt(stats['entropy_bits'], '.3f')} entropy"
        ),
        (
            f"usage:       perplexity {_fmt(stats['perplexity'], '.1f')}, {stats['codebook_used']} of "
            f"{stats['codebook_size']} codes used ({stats['codebook_used_fraction']:.1%})"
        ),
    ]
    if args.plot:
        lines.append(f"plot:        {args.plot}")
    if args.page:
        lines.append(f"page:        {args.page} (per head; image galleries: viq show MODEL {args.path} -o PAGE.html)")
    print("\n".join(lines))
    return EXIT_OK


_EPILOG_EXTRACT = """examples:
  viq extract viq-16k photos/ -o codes.store
  viq extract owner/ViQ data.jsonl -o codes.store --image-root images/ --dtype bfloat16
  viq extract viq-16k 'shards/{00000..09999}.tar' -o codes.store --max-pixels 1048576
  viq extract viq-16k train.parquet -o codes.store --image-column jpg --id-column key
  torchrun --nproc_per_node 8 -m viq extract viq-16k shards/ -o codes.store --dtype bfloat16
  srun --ntasks 64 viq extract viq-16k shards/ -o codes.store      # ranks from SLURM_PROCID / SLURM_NTASKS
"""


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``extract`` and ``store`` (with its actions ``verify`` and ``stats``)."""
    p = sub.add_parser(
        "extract",
        parents=[common],
        help="extract codes of many images into a code store",
        description="Encode every image of an input (folder, LLaVA JSON/JSONL, WebDataset .tar shards, "
        "Parquet / Arrow / saved datasets) into a code store. Resumable: re-run the same "
        "command after an interruption. Multi-GPU / multi-node: torchrun, srun or mpirun "
        "... -m viq extract ... (rank and world size read from the launcher), or "
        "--rank/--world-size.",
        epilog=_EPILOG_EXTRACT,
        formatter_class=HelpFormatter,
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help="model: a directory (viq or official) or a Hub id")
    p.add_argument(
        "input",
        nargs="?",
        metavar="INPUT",
        help="image folder, LLaVA .json/.jsonl, tar shards (file, folder or 'shards/{00000..00999}.tar'), "
        ".parquet / .arrow file or folder, or a folder saved by datasets.save_to_disk",
    )
    p.add_argument("-o", "--output", dest="out", metavar="STORE", help="code store directory (created or appended to)")
    # the flags of earlier releases, still accepted
    p.add_argument("--model", dest="model_flag", help=argparse.SUPPRESS)
    p.add_argument("--input", dest="input_flag", help=argparse.SUPPRESS)
    p.add_argument("--out", dest="out", help=argparse.SUPPRESS)
    p.add_argument(
        "--image-root", metavar="DIR", help="LLaVA inputs and image-path columns: folder the paths are relative to"
    )
    p.add_argument(
        "--image-column",
        default="image",
        metavar="NAME",
        help="columnar inputs: column with the image bytes, path or {bytes, path} struct (default image)",
    )
    p.add_argument(
        "--id-column",
        metavar="NAME",
        help="columnar inputs: column with the store id (default: the image path, else <file>/<row>)",
    )
    p.add_argument(
        "--rank",
        type=int,
        metavar="R",
        help="this process's rank (default: from torchrun / SLURM / OpenMPI, else 0); give with --world-size",
    )
    p.add_argument("--world-size", type=positive_int, metavar="W", help="number of extracting processes")
    p.add_argument("--batch-tokens", type=positive_int, default=8192, metavar="N", help="patch tokens per forward pass")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="image decoding workers (default 2)")
    p.add_argument(
        "--flush-every",
        type=positive_int,
        default=256,
        metavar="N",
        help="finalise a shard every N stored images: a kill redoes at most N images plus the "
        "pack being encoded (--batch-tokens)",
    )
    p.add_argument("--entropy-coding", action="store_true", help="LZMA-compress the code shards (new stores only)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_preprocess_options(p)
    add_model_options(p)  # --device auto: this rank's GPU (LOCAL_RANK) if any
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser(
        "store",
        parents=[common],
        help="check or summarise a code store",
        description="Code stores (directories of code shards written by extraction).",
        formatter_class=HelpFormatter,
    )
    store_sub = p.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    q = store_sub.add_parser(
        "verify",
        help="checksums, index vs shards, code ranges, duplicates",
        description="Check every byte of a store. Exit 0: sound; 1: problems (listed); 2: the store cannot be opened.",
    )
    q.add_argument("path", metavar="STORE")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    q.add_argument(
        "--repair", action="store_true", help="exit 0 when the only findings were damaged index files, now rebuilt"
    )
    q.set_defaults(func=cmd_store_verify)
    q = store_sub.add_parser("stats", help="images, bits per pixel, code usage, entropy, perplexity")
    q.add_argument("path", metavar="STORE")
    q.add_argument("--plot", metavar="PNG", help="write the code-usage histogram to this PNG")
    q.add_argument(
        "--page",
        metavar="HTML",
        help="write the codebook page (usage, entropy, dead codes per head, the "
        "most used codes) to this self-contained HTML file",
    )
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_store_stats)
