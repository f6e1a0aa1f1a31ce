"""`dpn demo`: the main job on the embedded default.

Runs the whole pipeline DAG (synthetic corpus -> preprocessing -> stage 1 -> stage 2 per compressor ->
evaluation -> registry) on local Ray and a local SQLite MLflow store, then prints the results table.
`--quick` only builds the tiny model and runs one batch through every compressor, printing per-layer
token counts and FLOPs (no training).
"""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job on the embedded default (synthetic corpus, tiny models)")
    p.add_argument("--work-dir", default=".dpn_work", help="where outputs, caches and the MLflow store live")
    p.add_argument("--quick", action="store_true", help="one forward pass per compressor, no training")
    p.set_defaults(handler=run)


def quick_forward() -> dict:
    """Tiny random model, one batch (two image samples + one text-only) through every compressor."""
    import torch

    from dpn.flops import flops_report
    from dpn.modeling_dpn import DPNForConditionalGeneration
    from dpn.presets import tiny

    torch.manual_seed(0)
    cfg = tiny()
    n_img = cfg.num_image_tokens
    img = cfg.image_token_id
    seqs = [[1, 10, 11] + [img] * n_img + [12, 13, 14], [1, 20] + [img] * n_img + [21, 22, 23, 24, 25], [1, 30, 31, 32]]
    L = max(map(len, seqs))
    ids = torch.tensor([[cfg.text_config.pad_token_id] * (L - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (L - len(s)) + [1] * len(s) for s in seqs])
    size = cfg.vision_config.image_size
    pixels = torch.randn(2, 3, size, size)
    base = None
    rows = {}
    for comp in ("none", "static", "dpn"):
        model = DPNForConditionalGeneration(tiny(compressor=comp)).eval()
        with torch.no_grad():
            out = model(ids, pixel_values=pixels, attention_mask=mask)
        vis, txt = out.visual_tokens_per_layer, out.text_tokens_per_layer
        if base is None:
            base = (vis, txt)
        rep = flops_report(model.config, vis[0].tolist(), txt[0].tolist(), base[0][0].tolist(), base[1][0].tolist())
        rows[comp] = {
            "routing_paths": out.routing_paths.tolist(),
            "visual_tokens_per_layer": vis.tolist(),
            "text_tokens_per_layer": txt.tolist(),
            "sample0_prefill_tflops": rep["tflops"],
            "sample0_saving": rep["saving"],
        }
        print(f"{comp:>7}: paths {out.routing_paths.tolist()}  visual tokens per layer (sample 0) {vis[0].tolist()}"
              f"  prefill {rep['tflops'] * 1e3:.3f} GFLOPs  saving {rep['saving']:.1%}")
    return rows


def run(args: argparse.Namespace) -> int:
    if args.quick:
        print(json.dumps(quick_forward()))
        return 0
    from jobs.pipeline import run_and_report

    return run_and_report(recipe="tiny", config_file=None, work_dir=args.work_dir, trigger="manual", demo=True)
