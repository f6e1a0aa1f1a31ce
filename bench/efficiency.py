"""Efficiency of every compressor in one process: FLOPs, prefill time, KV cache, decode speed.

    .venv/bin/python bench/efficiency.py --markdown bench/RESULTS_efficiency.md      # CPU, ~3-5 min

Latency on an accelerator (TTFT p50 / p99, decode tokens/s at batch 1 and 8, peak memory, LLaVA-1.5 and
LLaVA-HR geometries) is `bench/latency.py --device cuda`, which reuses this file's rows and KV accounting.

1. FLOPs per sample at LLaVA-1.5-7B geometry, analytic (`dpn.flops`; 576 visual tokens, `--text-tokens`
   text tokens), both conventions, the saving vs the uncompressed baseline, and the KV cache after
   prefill in bf16.
2. Measured on CPU (a mid-size geometry, 12 layers, d=1024, 24x24 = 576 visual tokens; `--geometry 7b`
   the true 7B geometry with CLIP ViT-L/336, for smoke runs), random weights: prefill wall time (median of
   `--repeats`, methods interleaved so drift hits all alike), exact FLOPs of the layers as run (from the
   model's own per-layer token counts), time_saving / flops_saving (how much of the FLOPs saving becomes
   wall time; 1.0 = all of it), KV-cache bytes after prefill, greedy decode tokens/s.

All methods share ONE set of weights: the model is built once with compressor "dpn" (so its pooling
experts and routers exist) and each method switches `config.compressor`. Random routers choose
arbitrary paths, so the DPN rows force a path (`--dpn-paths`); the router still runs and scales tokens.
On CPU the vision tower is a 2-layer, 64-wide stand-in that still yields a 24 x 24 grid, so the timing
is the LLM's (the projector is < 1 % of it).

Prints the tables, then one JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ("none", "static", "dpn", "fastv", "pdrop")  # the measured ones of dpn.compressors.COMPRESSORS


def parse_args(argv=None) -> argparse.Namespace:
    from dpn.compressors import parse_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (the only one; accelerators: bench/latency.py)")
    p.add_argument("--geometry", default=None, help="mid | 7b (default: mid)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32)")
    p.add_argument("--repeats", type=int, default=7, help="timed prefills per method (median reported)")
    p.add_argument("--decode-tokens", type=int, default=16, help="greedy decode steps per timed decode")
    p.add_argument("--decode-repeats", type=int, default=3, help="timed decodes per method (median reported)")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens per prompt (LLaVA-style prompt)")
    p.add_argument("--dpn-paths", default="4-2-1;2-2-2", help="forced DPN paths, ';'-separated (factor per DPE)")
    p.add_argument("--layers", type=int, default=None, help="override the measured geometry's layer count")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--markdown", default=None, help="also write the tables and the command to this file")
    args = p.parse_args(argv)
    if args.device == "cuda":
        p.error("--device cuda is measured by bench/latency.py --device cuda (TTFT p50/p99, decode tokens/s at "
                "batch 1 and 8, peak memory, LLaVA-1.5 and LLaVA-HR geometries)")
    if args.device != "cpu":
        p.error(f"--device must be cpu, got {args.device!r}")
    args.geometry = args.geometry or "mid"
    args.dtype = args.dtype or "float32"
    if args.geometry not in ("mid", "7b") or args.dtype not in ("float32", "bfloat16"):
        p.error(f"--geometry must be mid or 7b and --dtype float32 or bfloat16, got {args.geometry!r}, {args.dtype!r}")
    if min(args.repeats, args.decode_tokens, args.decode_repeats) < 1 or args.text_tokens < 2:
        p.error("--repeats, --decode-tokens and --decode-repeats must be >= 1, --text-tokens >= 2")
    args.methods = args.methods.split(",")
    if "none" not in args.methods or any(m not in METHODS for m in args.methods):
        p.error(f"--methods must be a subset of {','.join(METHODS)} including none (the baseline), got {args.methods}")
    try:
        args.dpn_paths = [parse_path(path) for path in args.dpn_paths.split(";")]  # "4-2-1" (or the older "4,2,1")
    except ValueError:
        p.error(f"--dpn-paths must look like 4-2-1;2-2-2, got {args.dpn_paths!r}")
    return args


# ----- geometries ------------------------------------------------------------------------------------
def mid_config(layers: int | None = None):
    """12 layers, d=1024 (16 heads of 64), FFN 2816 (LLaMA's 2.7 x d), 32k vocab; a 2-layer, 64-wide CLIP
    stand-in on 48-px images with 2-px patches: a 24 x 24 grid, 576 visual tokens as at 7B."""
    from transformers import CLIPVisionConfig, LlamaConfig

    from dpn.configuration_dpn import DPNConfig

    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=48, patch_size=2, projection_dim=64)
    text = LlamaConfig(vocab_size=32064, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers or 12,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return DPNConfig(vision_config=vision, text_config=text, image_token_id=32000, compressor="dpn")


def seven_b_config(layers: int | None = None):
    """LLaVA-1.5-7B: CLIP ViT-L/336 + Vicuna-7B geometry (`--layers` shortens the LLM, for smoke runs)."""
    from transformers import CLIPVisionConfig, LlamaConfig

    from dpn.configuration_dpn import DPNConfig
    from dpn.presets import llava_1_5_7b

    cfg = llava_1_5_7b(compressor="dpn")
    if layers is None:
        return cfg
    text = LlamaConfig(**{**cfg.text_config.to_dict(), "num_hidden_layers": layers})
    vision = CLIPVisionConfig(**cfg.vision_config.to_dict())
    return DPNConfig(vision_config=vision, text_config=text, image_token_id=cfg.image_token_id, compressor="dpn")


# ----- one method on one model ----------------------------------------------------------------------
def method_rows(cfg, dpn_paths, methods=METHODS) -> list[dict]:
    """(name, compressor, forced path) of every row, the baseline first."""
    from dpn.compressors import format_path

    rows = [dict(name="baseline", compressor="none", path=None),
            dict(name=f"static {format_path(cfg.static_path)}", compressor="static", path=None)]
    rows += [dict(name=f"dpn {format_path(p)} (forced)", compressor="dpn", path=p) for p in dpn_paths]
    rows += [dict(name=f"fastv K={cfg.fastv_layer} R={cfg.fastv_ratio}", compressor="fastv", path=None),
             dict(name=f"pdrop {'/'.join(map(str, cfg.pdrop_layers))} x{cfg.pdrop_ratio}", compressor="pdrop", path=None)]
    return [r for r in rows if r["compressor"] in methods]


def kv_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def prompt(cfg, n_text: int, device):
    import torch

    pre = 5  # "<s> USER: " and the like, then the image, then the question and "ASSISTANT:"
    ids = [1] + list(range(100, 100 + pre - 1)) + [cfg.image_token_id] * cfg.num_image_tokens
    ids += list(range(200, 200 + n_text - pre))
    size = cfg.vision_config.image_size
    g = torch.Generator().manual_seed(0)
    return torch.tensor([ids], device=device), torch.randn(1, 3, size, size, generator=g).to(device)


def run_method(model, row, ids, pixels, sync, decode_tokens: int | None = None):
    """One prefill (and optionally greedy decode). Returns (prefill s, output, decode s per token)."""
    import torch

    cfg = model.config
    cfg.compressor = row["compressor"]
    kwargs = dict(pixel_values=pixels, use_cache=True, logits_to_keep=1,
                  route_index=torch.full((1,), ids.shape[1] - 1, device=ids.device))
    if row["path"] is not None:
        kwargs["force_path"] = torch.tensor([[cfg.expert_index(f) for f in row["path"]]], device=ids.device)
    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        out = model(ids, **kwargs)
        nxt = out.logits[:, -1].argmax(-1)
        sync()
        prefill = time.perf_counter() - t0
        per_token = None
        if decode_tokens:
            cache = out.cache
            sync()
            t0 = time.perf_counter()
            for _ in range(decode_tokens):
                step = model(nxt[:, None], cache=cache, logits_to_keep=1)
                nxt = step.logits[:, -1].argmax(-1)
            sync()
            per_token = (time.perf_counter() - t0) / decode_tokens
    return prefill, out, per_token


# ----- the benchmark ---------------------------------------------------------------------------------
def analytic_7b(n_text: int, dpn_paths, methods) -> list[dict]:
    from dpn.flops import analytic_token_counts, flops_report
    from dpn.presets import llava_1_5_7b

    cfg = llava_1_5_7b(compressor="dpn")
    tc = cfg.text_config
    per_token_kv = 2 * tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads) * 2  # K and V, bf16
    out = []
    for row in method_rows(cfg, dpn_paths, methods):
        vis, txt = analytic_token_counts(cfg, n_text, row["path"], row["compressor"])
        rep = flops_report(cfg, vis, txt)
        out.append(dict(method=row["name"], visual_first_last=(vis[0], vis[-1]), tflops=rep["tflops"],
                        saving=rep["saving"], tflops_exact=rep["tflops_exact"], saving_exact=rep["saving_exact"],
                        kv_cache_mib_bf16=sum(v + t for v, t in zip(vis, txt, strict=True)) * per_token_kv / 2**20,
                        visual_tokens_per_layer=vis))
    return out


# Long on purpose: one measurement protocol (build, warm up, interleave methods, record) read top to bottom.
def measured(args) -> tuple[dict, list[dict]]:
    import torch

    from dpn.flops import flops_report
    from dpn.modeling_dpn import DPNForConditionalGeneration

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = seven_b_config(args.layers) if args.geometry == "7b" else mid_config(args.layers)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        t0 = time.perf_counter()
        with device:
            model = DPNForConditionalGeneration(cfg).eval()
        build_s = time.perf_counter() - t0
    finally:
        torch.set_default_dtype(prev)
    for r in model.routers.values():  # irrelevant to the forced paths, but make the gate non-uniform
        torch.nn.init.normal_(r.fc2.weight, std=1.0)
    sync = lambda: None  # noqa: E731 -- CPU: nothing to wait for
    ids, pixels = prompt(cfg, args.text_tokens, device)
    pixels = pixels.to(dtype)
    rows = method_rows(cfg, args.dpn_paths, args.methods)

    for row in rows:  # warm-up (allocator, kernels, thread pool)
        run_method(model, row, ids, pixels, sync)
    times = {r["name"]: [] for r in rows}
    for _ in range(args.repeats):
        for row in rows:
            times[row["name"]].append(run_method(model, row, ids, pixels, sync)[0])

    decode = {r["name"]: [] for r in rows}
    for _ in range(args.decode_repeats):
        for row in rows:
            _, out, per_token = run_method(model, row, ids, pixels, sync, decode_tokens=args.decode_tokens)
            decode[row["name"]].append(per_token)

    results = []
    base = None
    for row in rows:
        _, out, _ = run_method(model, row, ids, pixels, sync)
        vis = out.visual_tokens_per_layer[0].tolist()
        txt = out.text_tokens_per_layer[0].tolist()
        rep = flops_report(cfg, vis, txt)
        med = statistics.median(times[row["name"]])
        res = dict(method=row["name"], prefill_ms=med * 1e3, prefill_ms_best=min(times[row["name"]]) * 1e3,
                   prefill_ms_all=[t * 1e3 for t in times[row["name"]]],
                   gflops_exact=rep["tflops_exact"] * 1e3, flops_saving=rep["saving_exact"],
                   flops_saving_fastv_convention=rep["saving"], kv_cache_mib=kv_bytes(out.cache) / 2**20,
                   decode_tokens_per_s=1.0 / statistics.median(decode[row["name"]]), visual_tokens_per_layer=vis,
                   routing_path=out.routing_paths[0].tolist())
        if base is None:
            base = res
        res["time_saving"] = 1.0 - med / (base["prefill_ms"] / 1e3)
        res["time_saving_best"] = 1.0 - res["prefill_ms_best"] / base["prefill_ms_best"]
        fs = res["flops_saving"]
        res["time_over_flops_saving"] = res["time_saving"] / fs if fs > 0 else None
        res["time_over_flops_saving_best"] = res["time_saving_best"] / fs if fs > 0 else None
        results.append(res)
    tc = cfg.text_config
    info = dict(device=args.device, dtype=str(dtype).replace("torch.", ""), layers=tc.num_hidden_layers,
                hidden=tc.hidden_size, ffn=tc.intermediate_size, heads=tc.num_attention_heads,
                visual_tokens=cfg.num_image_tokens, text_tokens=args.text_tokens, dpe_layers=cfg.dpe_layers,
                threads=torch.get_num_threads(), build_s=build_s, repeats=args.repeats,
                decode_tokens=args.decode_tokens, decode_repeats=args.decode_repeats)
    return info, results


def fmt_tables(args, a7b, info, meas, wall_s, load_before, load_after) -> str:
    lines = []
    lines.append(f"### FLOPs per sample at LLaVA-1.5-7B geometry (analytic, 576 visual + {args.text_tokens} text tokens)")
    lines.append("")
    lines.append("| method | visual tokens (first / last layer) | LLM prefill TFLOPs (FastV conv.) | saving | TFLOPs (exact) | saving (exact) | KV cache after prefill (MiB, bf16) |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for r in a7b:
        lines.append(f"| {r['method']} | {r['visual_first_last'][0]} / {r['visual_first_last'][1]} | {r['tflops']:.3f} | "
                     f"{r['saving']:.1%} | {r['tflops_exact']:.3f} | {r['saving_exact']:.1%} | {r['kv_cache_mib_bf16']:.0f} |")
    lines.append("")
    geo = (f"{info['layers']} layers, d={info['hidden']}, FFN {info['ffn']}, {info['heads']} heads, "
           f"{info['visual_tokens']} visual + {info['text_tokens']} text tokens, {info['dtype']}, batch 1, "
           f"{info['threads']} threads, DPE layers {info['dpe_layers']}")
    lines.append(f"### Measured on {info['device']} ({geo})")
    lines.append("")
    head = ("| method | visual tokens per layer | LLM GFLOPs (exact) | FLOPs saving | prefill ms (median of "
            f"{info['repeats']}; best) | time saving (median; best) | time / FLOPs saving (median; best) | "
            f"KV cache (MiB) | decode tok/s (median of {info['decode_repeats']} x {info['decode_tokens']}) |")
    lines.append(head)
    lines.append("| --- " * (head.count("|") - 1) + "|")
    for r in meas:
        ratio = "-" if r["time_over_flops_saving"] is None else (
            f"{r['time_over_flops_saving']:.2f}; {r['time_over_flops_saving_best']:.2f}")
        vis = r["visual_tokens_per_layer"]
        compact = []
        for v in vis:  # run-length: 576x2 288x10
            if compact and compact[-1][0] == v:
                compact[-1][1] += 1
            else:
                compact.append([v, 1])
        vis_s = " ".join(f"{v}x{n}" for v, n in compact)
        line = (f"| {r['method']} | {vis_s} | {r['gflops_exact']:.1f} | {r['flops_saving']:.1%} | "
                f"{r['prefill_ms']:.0f}; {r['prefill_ms_best']:.0f} | {r['time_saving']:.1%}; {r['time_saving_best']:.1%} | "
                f"{ratio} | {r['kv_cache_mib']:.1f} | {r['decode_tokens_per_s']:.1f} |")
        lines.append(line)
    lines.append("")
    lines.append(f"Whole run: {wall_s:.0f} s in one process (model build {info['build_s']:.0f} s). "
                 f"Load average (1 min) before / after: {load_before:.2f} / {load_after:.2f} on {os.cpu_count()} cores.")
    return "\n".join(lines)


NOTES = """Reading the tables:
- FLOPs are the LLM decoder layers at prefill (`dpn.flops`): "FastV conv." = 4nd^2 + 2n^2d + 2ndm per layer
  (the FastV / PDrop papers' count), "exact" = the matmul FLOPs an HF LLaMA layer executes (SwiGLU, 2 per MAC).
  FastV / PDrop's attention ranking is not counted (at 7B one ranking adds ~0.25 % of the exact prefill).
- The measured FLOPs saving is the exact one, from the per-layer token counts the model itself reported.
  time / FLOPs saving: 1.0 means the whole FLOPs saving became prefill wall time (target >= 0.8).
- "median" is the statistic of record; "best" is the least-disturbed run. On a machine shared with other
  jobs the median absorbs their load (compare the load averages): the best-run ratio then shows what the
  code itself achieves, the median what a busy machine gave.
- The DPN rows force a path, since random routers choose arbitrary ones; the router still runs and scales the
  pooled tokens, so its cost is in the timing. "static" is the same pooling without a router.
- KV cache: the bytes of every layer's K and V after prefill (each layer keeps its own length).
- Decode: greedy steps over the per-layer caches, batch 1; at this size decode is bound by reading the
  weights, so the shorter caches change it little.
- Accelerator latency (TTFT p50/p99, decode tokens/s at batch 1 and 8, peak memory, LLaVA-1.5 and LLaVA-HR at
  7B / 13B) is `bench/latency.py --device cuda`; see bench/RESULTS_latency.md.
"""


def main(argv=None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    a7b = analytic_7b(args.text_tokens, args.dpn_paths, args.methods)
    info, meas = measured(args)
    wall = time.perf_counter() - t_start
    load_after = os.getloadavg()[0]
    tables = fmt_tables(args, a7b, info, meas, wall, load_before, load_after)
    print(tables)
    if args.markdown:
        import torch

        cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
        header = (
            "# Efficiency benchmark\n\n"
            "Generated by `bench/efficiency.py`; see its docstring for what is measured and how.\n\n"
            f"Command: `{cmd}`\n\n"
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"python {platform.python_version()}.\n\n"
        )
        Path(args.markdown).write_text(header + tables + "\n\n" + NOTES)
    print(json.dumps(dict(info=info, analytic_7b=a7b, measured=meas, wall_s=wall,
                          load_avg_before=load_before, load_avg_after=load_after)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
