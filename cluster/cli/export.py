"""`dip export CHECKPOINT --out model.pt`: one committed checkpoint -> one sampling state dict.

CHECKPOINT is a committed `step-N/` directory, or a checkpoints directory (its newest committed
step is used). The default exports the EMA weights (what the paper samples with) as
{"model_config": ..., "state_dict": ...}, the format `dip sample` loads; `--official` writes the
authors' layout {"state_dict": {"denoiser.<key>": raw, "ema_denoiser.<key>": EMA}}; `--weights model`
exports the raw (non-EMA) weights, consolidated from the ZeRO shards, instead of the EMA. Both keep
"trained_with": {"resolution": N} from the run's config, the resolution `dip sample` defaults to.
"""
from __future__ import annotations

import os


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="consolidate a training checkpoint into one EMA state dict for `dip sample`",
        description=__doc__.split("\n\n", 1)[1])
    parser.add_argument("checkpoint", help="a committed step-N/ directory, or a checkpoints directory (newest step)")
    parser.add_argument("--out", required=True, help="output file, e.g. model.pt")
    parser.add_argument("--official", action="store_true",
                        help="write the authors' layout: {'state_dict': {'denoiser.' + key: raw, 'ema_denoiser.' + key: EMA}}")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema",
                        help="ema (default): the EMA weights; model: the raw weights, consolidated from ZeRO shards")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from trainer.export import export

    step_dir = export(args.checkpoint, args.out, official=args.official, weights=args.weights)
    kind = "official layout" if args.official else "model_config + state_dict"
    print(f"dip export: {args.weights} weights of {step_dir} -> {os.path.abspath(args.out)} ({kind})")
    return 0
