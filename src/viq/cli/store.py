"""``viq extract`` (images -> a code store) and ``viq store verify|stats``."""

from __future__ import annotations

import argparse
import json

from viq.cli.common import DTYPES, EXIT_FAILED, EXIT_OK, CLIError, HelpFormatter, log, positive_int


def cmd_extract(args: argparse.Namespace) -> int:
    import torch

    from viq.extract import extract
    from viq.formats.image import PreprocessConfig

    pre_kwargs = {k: v for k, v in (("max_pixels", args.max_pixels), ("min_pixels", args.min_pixels)) if v}
    try:
        counts = extract(args.model, args.input, args.out, image_root=args.image_root, image_column=args.image_column,
                         id_column=args.id_column, rank=args.rank, world_size=args.world_size, device=args.device,
                         dtype=getattr(torch, args.dtype), batch_tokens=args.batch_tokens, num_workers=args.workers,
                         preprocess=PreprocessConfig(**pre_kwargs), flush_every=args.flush_every,
                         entropy_coding=args.entropy_coding, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e), EXIT_FAILED) from None
    log.info("encoded %d, already stored %d, deduplicated %d, failed %d (of %d on this rank)", counts["encoded"],
             counts["existing"], counts["deduplicated"], counts["failed"], counts["images"])
    print(json.dumps(counts))
    return EXIT_FAILED if counts["failed"] else EXIT_OK


def cmd_store_verify(args: argparse.Namespace) -> int:
    from viq.store.check import verify_main

    return verify_main(args.path)


def cmd_store_stats(args: argparse.Namespace) -> int:
    from viq.store.check import stats_main

    return stats_main(args.path, plot=args.plot, as_json=args.json)


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``extract`` and ``store`` (with its actions ``verify`` and ``stats``)."""
    p = sub.add_parser("extract", parents=[common], help="extract codes of many images into a code store",
                       description="Encode every image of an input (folder, LLaVA JSON/JSONL, WebDataset .tar shards, "
                                   "Parquet / Arrow / saved datasets) into a code store. Resumable: re-run the same "
                                   "command after an interruption. Multi-GPU / multi-node: torchrun, srun or mpirun "
                                   "... -m viq extract ... (rank and world size read from the launcher), or "
                                   "--rank/--world-size.",
                       formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, metavar="MODEL", help="model directory (viq or official)")
    p.add_argument("--input", required=True, metavar="INPUT",
                   help="image folder, LLaVA .json/.jsonl, tar shards (file, folder or 'shards/{00000..00999}.tar'), "
                        ".parquet / .arrow file or folder, or a folder saved by datasets.save_to_disk")
    p.add_argument("--out", required=True, metavar="STORE", help="code store directory (created or appended to)")
    p.add_argument("--image-root", metavar="DIR", help="LLaVA inputs and image-path columns: folder the paths are "
                                                       "relative to")
    p.add_argument("--image-column", default="image", metavar="NAME",
                   help="columnar inputs: column with the image bytes, path or {bytes, path} struct (default image)")
    p.add_argument("--id-column", metavar="NAME",
                   help="columnar inputs: column with the store id (default: the image path, else <file>/<row>)")
    p.add_argument("--rank", type=int, metavar="R", help="this process's rank (default: from torchrun / SLURM / "
                                                          "OpenMPI, else 0); give with --world-size")
    p.add_argument("--world-size", type=positive_int, metavar="W", help="number of extracting processes")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: auto = this rank's GPU if any)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--batch-tokens", type=positive_int, default=8192, metavar="N", help="patch tokens per forward pass")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="image decoding workers (default 2)")
    p.add_argument("--flush-every", type=positive_int, default=256, metavar="N",
                   help="finalise a shard after this many images (at most this much work is redone after a kill)")
    p.add_argument("--entropy-coding", action="store_true", help="LZMA-compress the code shards (new stores only)")
    p.add_argument("--max-pixels", type=positive_int, metavar="N", help="downscale larger images to at most this area")
    p.add_argument("--min-pixels", type=positive_int, metavar="N", help="upscale smaller images to at least this area")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("store", parents=[common], help="check or summarise a code store",
                       description="Code stores (directories of code shards written by extraction).",
                       formatter_class=HelpFormatter)
    store_sub = p.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    q = store_sub.add_parser("verify", help="checksums, index vs shards, code ranges, duplicates")
    q.add_argument("path", metavar="STORE")
    q.set_defaults(func=cmd_store_verify)
    q = store_sub.add_parser("stats", help="images, bits per pixel, code usage, entropy, perplexity")
    q.add_argument("path", metavar="STORE")
    q.add_argument("--plot", metavar="PNG", help="write the code-usage histogram to this PNG")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=cmd_store_stats)
