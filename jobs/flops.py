"""`dpn flops`: price a compressor / routing path on a model geometry, without weights.

    dpn flops                 # llava-1.5-7b, its compressor (dpn) on the default path, vs the baseline
    dpn flops --preset llava-1.5-7b --compressor dpn --path 4,2,1 --text-tokens 64
    dpn flops --config runs/x/checkpoint --compressor static

Every run prices two things on the same sample: the chosen compressor and path, and the uncompressed
LLaVA-1.5 baseline (compressor none). Defaults: preset llava-1.5-7b, the config's compressor, 64 text
tokens; dpn without --path takes the config's default pyramid path (`static_path`, (4, 2, 1) for three
DPEs: strongest pooling first), the path the method notes quote, since a routed path is chosen per sample.

Prints a one-line summary, then one JSON object as the last stdout line (see `dpn.flops.flops_report`):
config, compressor, path, path_source ("given" | "default" | null: no path), text_tokens,
baseline_compressor ("none"), paper_saving (the saving the paper reports for DPN on this preset, or null),
the report's tflops* / baseline_tflops* / saving*, vision_tflops(_by_part), projector_tflops and per-layer
token counts. LLaVA-HR presets (llava-hr-7b, llava-hr-x-13b) price both vision branches.
Bad arguments exit 2 with the value named.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_PRESET = "llava-1.5-7b"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "flops",
        help="LLM prefill FLOPs of a compressor / routing path vs the uncompressed baseline (no weights needed)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help=f"model geometry from dpn.presets (default {DEFAULT_PRESET})")
    src.add_argument("--config", default=None, help="a DPNConfig config.json, or a directory holding one")
    p.add_argument(
        "--compressor",
        default=None,
        help="none | static | dpn | fastv | pdrop (default: the config's own compressor)",
    )
    p.add_argument(
        "--path",
        default=None,
        help="compression factor at each DPE layer, comma-separated (1 keep, 2 = (1,2), 4 = (2,2)), e.g. 4,2,1; "
        "dpn and static default to the config's static_path (4,2,1 at 7B)",
    )
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens of the sample (default 64)")
    p.set_defaults(handler=run)


def _load_config(args: argparse.Namespace):
    if args.config is not None:
        from dpn.configuration_dpn import DPNConfig

        path = Path(args.config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"--config {args.config}: no such config file (give a config.json or a directory with one)")
        try:
            return DPNConfig.from_json_file(str(path)), str(path)
        except (ValueError, TypeError, AttributeError, KeyError) as e:
            # Malformed JSON, a non-object, or fields DPNConfig refuses: name the file, no traceback.
            raise ValueError(f"--config {path}: not a valid DPNConfig config.json ({type(e).__name__}: {e})") from None
    from dpn.presets import PRESETS, get_preset

    name = args.preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r} is unknown; choose one of {sorted(PRESETS)}")
    return get_preset(name), name


def _parse_path(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--path {text!r} must be comma-separated integers, e.g. 4,2,1") from None


def run(args: argparse.Namespace) -> int:
    from dpn.flops import ANALYTIC_COMPRESSORS, analytic_token_counts, flops_report

    try:
        config, source = _load_config(args)
        compressor = args.compressor or config.compressor
        if compressor not in ANALYTIC_COMPRESSORS:
            raise ValueError(f"--compressor {compressor!r} is unknown; choose one of {list(ANALYTIC_COMPRESSORS)}")
        path = _parse_path(args.path)
        path_source = "given" if path is not None else None
        if path is None and compressor in ("dpn", "static"):
            # A routed path is chosen per sample; without one, price the config's default pyramid.
            path, path_source = list(config.static_path), "default"
        if args.text_tokens < 0:
            raise ValueError(f"--text-tokens must be >= 0, got {args.text_tokens}")
        visual, text = analytic_token_counts(config, args.text_tokens, path, compressor)
    except ValueError as e:
        print(f"dpn flops: error: {e}", file=sys.stderr)
        return 2

    # The report carries the uncompressed baseline (every layer sees the whole image: compressor none).
    report = flops_report(config, visual, text)
    from dpn.presets import PAPER_FLOPS_SAVING

    paper = PAPER_FLOPS_SAVING.get(source) if compressor in ("dpn", "static") else None
    result = {
        "config": source,
        "compressor": compressor,
        "path": path,
        "path_source": path_source,
        "text_tokens": args.text_tokens,
        "baseline_compressor": "none",
        "convention": "fastv (4nd^2 + 2n^2d + 2ndm per layer); *_exact = real matmul FLOPs",
        "paper_saving": paper,
        **report,
    }
    shown_path = f"path={path}" + (" (default)" if path_source == "default" else "")
    print(
        f"{compressor} {shown_path}: LLM prefill {report['tflops']:.4g} TFLOPs vs baseline (none) "
        f"{report['baseline_tflops']:.4g} (saving {100 * report['saving']:.1f}%"
        + (f"; the paper reports {100 * paper:.0f}% for DPN on {source}" if paper is not None else "")
        + f"); exact {report['tflops_exact']:.4g} vs {report['baseline_tflops_exact']:.4g}; visual tokens "
        f"{visual[0]} at layer 0; vision tower {report['vision_tflops']:.4g} TFLOPs ("
        + ", ".join(f"{k} {v:.3g}" for k, v in report["vision_tflops_by_part"].items())
        + f"), projector {report['projector_tflops']:.3g}"
    )
    print(json.dumps(result))
    return 0
