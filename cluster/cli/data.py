"""`dip data shard`: write an ImageFolder tree or the synthetic set into MDS / webdataset shards.

Registration is cheap: PIL, numpy, streaming and webdataset load inside the handler.
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="dataset tools (shard writing)")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    shard = data_sub.add_parser(
        "shard", help="write images into MDS and/or webdataset shards with a manifest",
        description="Write an ImageFolder tree (one sub-folder per class) or the built-in synthetic set into "
                    "shards. Without --resolution the original encoded bytes are stored (one shard set serves "
                    "every resolution); with it, images are ADM-center-cropped once and stored as PNG "
                    "(or JPEG with --encoding jpeg).")
    shard.add_argument("--src", required=True, help="ImageFolder root, or 'synthetic'")
    shard.add_argument("--out", required=True, help="output directory (must be empty unless --overwrite)")
    shard.add_argument("--format", default="both", choices=["mds", "wds", "both"])
    shard.add_argument("--resolution", type=int, default=None,
                       help="pre-crop to N x N (default: store originals; synthetic: generate at N, default 64)")
    shard.add_argument("--encoding", default="png", choices=["png", "jpeg", "npy"],
                       help="storage with --resolution: png (lossless), jpeg, or npy (raw uint8 pixels, "
                            "lossless, ~3 bytes/pixel, no decode cost: the fastest to read)")
    shard.add_argument("--jpeg-quality", type=int, default=95)
    shard.add_argument("--shard-size", default="256MB", help="bytes per shard, e.g. 64MB, 256MB, 1GB")
    shard.add_argument("--workers", type=int, default=1, help="writer processes")
    shard.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    shard.add_argument("--order-seed", type=int, default=0, help="seed of the (random) write order")
    shard.add_argument("--no-progress", action="store_true", help="no progress bar")
    synthetic = shard.add_argument_group("synthetic source (--src synthetic)")
    synthetic.add_argument("--num-images", type=int, default=None)
    synthetic.add_argument("--classes", type=int, default=10)
    synthetic.add_argument("--seed", type=int, default=0)
    shard.set_defaults(handler=run_shard)
    data.set_defaults(handler=lambda args: (data.print_help(), 2)[1])


def run_shard(args: argparse.Namespace) -> int:
    from data.sources import open_source
    from data.writer import ShardOptions, parse_size, write_shards

    source = open_source(args.src, args.num_images, args.classes, args.resolution, args.seed)
    options = ShardOptions(out=args.out, format=args.format, resolution=args.resolution, encoding=args.encoding,
                           jpeg_quality=args.jpeg_quality, shard_size=parse_size(args.shard_size),
                           workers=args.workers, overwrite=args.overwrite, order_seed=args.order_seed,
                           progress=not args.no_progress)
    manifest = write_shards(source, options)
    shards = ", ".join(f"{fmt}: {len(lst)} shards / {manifest['total_bytes'][fmt] / 2**20:.1f} MiB"
                       for fmt, lst in manifest["shards"].items())
    print(f"dip data shard: wrote {manifest['num_samples']} images of {manifest['num_classes']} classes "
          f"({shards}), skipped {len(manifest['skipped'])} undecodable file(s), in {manifest['seconds']:.1f} s "
          f"-> {args.out}/manifest.json")
    for entry in manifest["skipped"][:10]:
        print(f"  skipped {entry['key']}: {entry['reason']}")
    return 0
