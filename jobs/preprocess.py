"""`dpn preprocess`: validate, tokenize and shard a LLaVA annotations file with Ray Data
(see `pipelines/data/preprocess.py`)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from dpn.conversation import TEMPLATES  # no transformers at import: `dpn --help` stays fast

    p = subparsers.add_parser(
        "preprocess",
        help="LLaVA JSON + images -> validated, tokenized Parquet shards (Ray Data)",
        description="Stream a LLaVA annotations array, validate every record, tokenize it with a template, "
        "check its image and write Parquet shards under OUT/<fingerprint>/ (a re-run with the same inputs "
        "is a no-op). Bad records go to a quarantine table. Prints one JSON summary as the last line.",
    )
    p.add_argument("--annotations", required=True, help="LLaVA annotations: one JSON array of records")
    p.add_argument("--image-root", required=True, help="directory the records' image paths are relative to")
    p.add_argument("--tokenizer", required=True, help="saved fast tokenizer directory (with <image>)")
    p.add_argument("--template", required=True, choices=sorted(TEMPLATES), help="conversation template")
    p.add_argument("--out", required=True, help="output root; the run publishes OUT/<fingerprint>/")
    p.add_argument("--config", default="tiny",
                   help="model geometry: a preset name (tiny, llava-1.5-7b, ...) or a DPN config.json / saved "
                   "model directory; gives the image size and the visual tokens per image (default: tiny)")
    p.add_argument("--image-size", type=int, default=None, help="override the config's image side (pixels)")
    p.add_argument("--num-image-tokens", type=int, default=None, help="override the config's visual tokens per image")
    p.add_argument("--router-token", action="store_true", help="append <ROUTER> to every human turn (DPN)")
    p.add_argument("--image-storage", choices=("bytes", "pixels"), default="bytes",
                   help="store original image bytes + geometry (default) or processed float32 pixels")
    p.add_argument("--max-length", type=int, default=None, help="quarantine records with more tokens than this")
    p.add_argument("--rows-per-shard", type=int, default=1024, help="most records per shard file (default 1024)")
    p.add_argument("--image-identity", choices=("stat", "content"), default="stat",
                   help="images enter the fingerprint by (path, size, mtime) or by a hash of their bytes")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray instance (default: all)")
    p.add_argument("--follow-symlinks-outside-root", action="store_true",
                   help="read images through symlinks leading outside --image-root (default: quarantine them)")
    p.set_defaults(handler=_run)


def model_geometry(config: str) -> tuple[int, int]:
    """(image_size, num_image_tokens) of a preset name, a config.json file or a saved model directory."""
    from pathlib import Path

    from dpn.presets import PRESETS, get_preset

    if config in PRESETS:
        cfg = get_preset(config)
    else:
        from dpn.configuration_dpn import DPNConfig

        path = Path(config)
        if path.is_file():
            cfg = DPNConfig.from_json_file(str(path))
        elif (path / "config.json").is_file():
            cfg = DPNConfig.from_pretrained(str(path), local_files_only=True)
        else:
            raise ValueError(f"--config {config!r} is neither a preset ({sorted(PRESETS)}) nor a config.json "
                             f"file or a directory holding one")
    return cfg.vision_config.image_size, cfg.num_image_tokens


def _run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pipelines.data.preprocess import PreprocessConfig, preprocess

    try:
        image_size, num_image_tokens = model_geometry(args.config)
        cfg = PreprocessConfig(
            annotations=args.annotations, image_root=args.image_root, tokenizer=args.tokenizer,
            template=args.template, out=args.out,
            image_size=args.image_size if args.image_size is not None else image_size,
            num_image_tokens=args.num_image_tokens if args.num_image_tokens is not None else num_image_tokens,
            add_router_token=args.router_token, image_storage=args.image_storage, max_length=args.max_length,
            rows_per_shard=args.rows_per_shard, image_identity=args.image_identity, num_cpus=args.num_cpus,
            follow_symlinks_outside_root=args.follow_symlinks_outside_root,
        )
        summary = preprocess(cfg)
    except ValueError as e:
        print(f"dpn preprocess: error: {e}", file=sys.stderr)
        return 2
    print(summary.to_json(), flush=True)
    return 0
