"""FLOPs of DPN and its peers at LLaVA-HR geometry (analytic, `dpn.flops`), beside the paper's figures.

    .venv/bin/python bench/flops_hr.py --markdown bench/RESULTS_hr.md     # seconds, no weights

For llava-hr-7b and llava-hr-x-13b (and llava-1.5-7b for comparison): per method and routing path, the
visual tokens entering the first and last LLM layer, LLM prefill TFLOPs in the FastV convention and exactly,
the saving against compressor none, the vision tower (both branches) and projector, and the saving of the
whole forward (LLM exact + vision + projector). Then every routing path ranked by its saving, marking the
ones nearest the paper's figure. Prints the tables and one JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from efficiency import method_rows  # noqa: E402

PRESETS = ("llava-hr-7b", "llava-hr-x-13b", "llava-1.5-7b")
PATHS = ([4, 2, 1], [2, 2, 2], [4, 4, 4], [2, 2, 1], [2, 1, 1], [1, 1, 1])
MARKER = "## FLOPs tables"


def rows_of(name: str, n_text: int) -> tuple[list[dict], dict]:
    from dpn.compressors import format_path
    from dpn.flops import analytic_token_counts, flops_report
    from dpn.presets import get_preset

    cfg = get_preset(name, compressor="dpn")
    out = []
    base_total = None
    for row in method_rows(cfg, PATHS):
        if row["compressor"] == "static":
            continue  # the same token counts as dpn on the same path
        vis, txt = analytic_token_counts(cfg, n_text, row["path"], row["compressor"])
        rep = flops_report(cfg, vis, txt)
        total = rep["tflops_exact"] + rep["vision_tflops"] + rep["projector_tflops"]
        base_total = base_total or total
        out.append(dict(method=row["name"].replace(" (forced)", ""), first_last=(vis[0], vis[-1]),
                        tflops=rep["tflops"], saving=rep["saving"], tflops_exact=rep["tflops_exact"],
                        saving_exact=rep["saving_exact"], vision=rep["vision_tflops_by_part"],
                        projector=rep["projector_tflops"], total=total, total_saving=1 - total / base_total))
    paths = {}
    for path in itertools.product(cfg.expert_factors, repeat=len(cfg.dpe_layers)):
        vis, txt = analytic_token_counts(cfg, n_text, list(path), "dpn")
        rep = flops_report(cfg, vis, txt)
        total = rep["tflops_exact"] + rep["vision_tflops"] + rep["projector_tflops"]
        paths[format_path(path)] = dict(saving=rep["saving"], saving_exact=rep["saving_exact"],
                                               total_saving=1 - total / base_total)
    return out, paths


def fmt(name: str, rows: list[dict], paths: dict, paper: float | None, n_text: int) -> str:
    from dpn.presets import get_preset

    cfg = get_preset(name)
    lines = [f"### {name} ({cfg.num_image_tokens} visual + {n_text} text tokens, "
             f"{cfg.text_config.num_hidden_layers} LLM layers, DPE {cfg.dpe_layers})", ""]
    parts = list(rows[0]["vision"])
    lines.append("| method | visual tokens (first / last layer) | LLM prefill TFLOPs (FastV conv.) | saving | "
                 "TFLOPs (exact) | saving (exact) | vision TFLOPs (" + " + ".join(parts) + ") | projector | "
                 "whole forward TFLOPs (exact LLM + vision + projector) | saving |")
    lines.append("| --- " * 10 + "|")
    for r in rows:
        vis = f"{sum(r['vision'].values()):.3f} (" + " + ".join(f"{v:.3f}" for v in r["vision"].values()) + ")"
        lines.append(f"| {r['method']} | {r['first_last'][0]} / {r['first_last'][1]} | {r['tflops']:.3f} | "
                     f"{r['saving']:.1%} | {r['tflops_exact']:.3f} | {r['saving_exact']:.1%} | {vis} | "
                     f"{r['projector']:.3f} | {r['total']:.3f} | {r['total_saving']:.1%} |")
    if paper is not None:
        ranked = sorted(paths.items(), key=lambda kv: abs(kv[1]["saving"] - paper))[:4]
        near = ", ".join(f"{p} ({v['saving']:.1%}; whole forward {v['total_saving']:.1%})" for p, v in ranked)
        lo, hi = min(v["saving"] for v in paths.values()), max(v["saving"] for v in paths.values())
        lines += ["", f"The paper reports {paper:.0%} fewer FLOPs for DPN on this model. DPN paths reach "
                  f"{lo:.1%}-{hi:.1%} of the LLM prefill here; the paths nearest {paper:.0%} (FastV convention): {near}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens per sample (default 64)")
    p.add_argument("--markdown", default=None, help="also write the tables to this file")
    args = p.parse_args(argv)
    if args.text_tokens < 0:
        p.error(f"--text-tokens must be >= 0, got {args.text_tokens}")
    from dpn.presets import PAPER_FLOPS_SAVING

    blocks, result = [], {}
    for name in PRESETS:
        rows, paths = rows_of(name, args.text_tokens)
        blocks.append(fmt(name, rows, paths, PAPER_FLOPS_SAVING.get(name), args.text_tokens))
        result[name] = dict(rows=rows, paths=paths, paper_saving=PAPER_FLOPS_SAVING.get(name))
    text = "\n".join(blocks)
    print(text)
    if args.markdown:
        # The tables replace everything from their heading on; prose above it (the results file) is kept.
        cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
        out = Path(args.markdown)
        head = out.read_text().split(MARKER)[0] if out.is_file() else ""
        out.write_text(f"{head}{MARKER} (generated by `{cmd}`)\n\n{text}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
