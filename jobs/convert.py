"""`dpn convert`: write weights from other layouts as our `save_pretrained` model directory (`dpn.loading_hr`).

    dpn convert llava-hr --checkpoint /models/llava-hr-7b-sft-1024 --tokenizer TOK --out /models/llava-hr-7b-dpn
    dpn convert llava-hr-components --llm /models/vicuna-7b-v1.5 --clip /models/clip-vit-large-patch14-336 \\
        --convnext /models/convnext_large_mlp.clip_laion2b_ft_320 [--projector .../mm_projector.bin] \\
        --tokenizer TOK --out /models/llava-hr-7b-base

`llava-hr`: an original LLaVA-HR checkpoint (its `config.json` and weights); `llava-hr-components`: the parts
the `llava-hr-7b` / `llava-hr-x-13b` recipes start from (their `model.path`). With --tokenizer (a local
tokenizer directory; `<image>` / `<ROUTER>` are added if missing and saved beside the model) the token ids
are its own and the embeddings grow to it. Prints one JSON object as the last stdout line; a bad path or
layout exits 2 naming it, with nothing written.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="write LLaVA-HR weights (original layout or parts) in our format",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="convert_command", required=True)
    a = sub.add_parser("llava-hr", help="an original LLaVA-HR checkpoint directory")
    a.add_argument("--checkpoint", required=True, help="directory with LLaVA-HR's config.json and weights")
    b = sub.add_parser("llava-hr-components", help="Vicuna + CLIP + timm ConvNeXt (+ LLaVA-HR's stage-1 file)")
    b.add_argument("--llm", required=True, help="LLaMA-family LLM directory (Vicuna v1.5)")
    b.add_argument("--clip", required=True, help="CLIP directory (clip-vit-large-patch14-336)")
    b.add_argument("--convnext", required=True, help="timm ConvNeXt directory (convnext_large_mlp.clip_laion2b_ft_320, "
                   "convnext_xxlarge.clip_laion2b_soup)")
    b.add_argument("--projector", default=None, help="LLaVA-HR's stage-1 mm_projector.bin (projector + fusion)")
    b.add_argument("--image-size", type=int, default=1024, help="input resolution (default 1024)")
    for q in (a, b):
        q.add_argument("--out", required=True, help="output directory (must not exist yet)")
        q.add_argument("--tokenizer", default=None, help="tokenizer directory whose ids the model takes")
        q.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="saved dtype")
        q.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    import torch

    from dpn.loading_hr import from_hr_components, from_llava_hr
    from dpn.tokenizer import ensure_special_tokens, load_tokenizer

    out = Path(args.out)
    try:
        if out.exists():
            raise ValueError(f"--out {args.out}: already exists; give a new directory")
        tokenizer = None
        if args.tokenizer:
            tokenizer = load_tokenizer(args.tokenizer)
            ensure_special_tokens(tokenizer)
        dtype = getattr(torch, args.dtype)
        if args.convert_command == "llava-hr":
            model = from_llava_hr(args.checkpoint, dtype=dtype, tokenizer=tokenizer)
        else:
            model = from_hr_components(args.llm, args.clip, args.convnext, args.projector, tokenizer=tokenizer,
                                       dtype=dtype, image_size=args.image_size)
    except (ValueError, FileNotFoundError) as e:
        print(f"dpn convert: error: {e}", file=sys.stderr)
        return 2
    # Written next to the target and renamed: an interrupted run leaves no half-written model directory.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    cfg = model.config
    print(json.dumps({"out": str(out.absolute()), "visual_tokens": cfg.num_image_tokens,
                      "image_size": cfg.vision_config.image_size, "image_token_id": cfg.image_token_id,
                      "router_token_id": cfg.router_token_id, "vocab_size": cfg.text_config.vocab_size,
                      "parameters": sum(p.numel() for p in model.parameters())}))
    return 0
