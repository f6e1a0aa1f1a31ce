"""Serving latency of DPN against no compression, FastV and PyramidDrop at real geometry, random weights:
time to first token (p50 / p99), decode tokens/s and peak memory, at batch 1 and 8.

    python bench/latency.py --device cuda --geometry all --markdown bench/RESULTS_latency.md   # H100 / H200
    .venv/bin/python bench/latency.py --device cpu --geometry tiny                             # CPU, seconds

Geometries (`dpn.presets`): llava-1.5-7b, llava-1.5-13b (CLIP ViT-L/336, 576 visual tokens), llava-hr-7b,
llava-hr-x-13b (CLIP-L + ConvNeXt-L / -XXL at 1024 px, 1024 visual tokens); `tiny` = the `tiny` and
`llava-hr-tiny` presets (CPU test). Each model is built once with compressor "dpn" (random weights, bf16 on
CUDA) and every method switches `config.compressor`, so all rows share the weights.

Rows: none (the baseline), DPN at fixed paths (`--paths`: 4-2-1, 2-2-2 and 1-1-1, which keeps every token
and so measures the routers' own cost), DPN at budgets (`--budgets`), FastV (K=2, R=0.5), PDrop (8/16/24,
x0.5). Random routers have no calibrated budget curve, so a budget is EMULATED by forcing a path mix whose
mean analytic LLM prefill FLOPs is the budget's fraction of the baseline's (`budget_mix`: the two paths
bracketing the target, in the proportion that hits it); at batch 8 the batch holds that mix (padded
per-sample pyramids), at batch 1 the repeats cycle through it.

Measured per row (CUDA syncs around every timed region; the rows are interleaved, one prefill of each per
pass, so drift in clocks or in other load hits every row alike):
  TTFT: one prefill from device-resident token ids and preprocessed pixels (vision tower, projector, LLM
        prefill, the first token's argmax); p50 / p99 over `--repeats` runs after `--warmup` runs.
        Image decoding and tokenisation are not included.
  decode: `--decode-tokens` greedy steps over the per-layer KV caches; tokens/s of the batch and per sequence
        (median of `--decode-repeats`).
  peak memory: torch.cuda.max_memory_allocated over a prefill + decode of the row (weights included).
  FLOPs: the LLM prefill FLOPs the model reported for the row (exact convention, `dpn.flops`), so the time
        saving can be read against the FLOPs saving.

Attention: "sdpa" (torch's scaled_dot_product_attention; on CUDA it runs the FlashAttention-2 kernel for the
unpadded causal prefill and decode, the memory-efficient kernel where a padding mask is passed).
"flash_attention_2" (the flash-attn package through transformers) is accepted when installed but reported
as unsupported: the DPN forward passes 4-D additive masks (`modeling_dpn._attention_mask`) that
transformers' flash path cannot take; it needs 2-D padding masks there first.

This supersedes `bench/efficiency.py --device cuda` (which now points here); `bench/efficiency.py` stays the
CPU study of FLOPs saving against prefill time. Prints a table per geometry and one JSON object as the last
stdout line; `--markdown FILE` also writes the tables with the command and the device.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `efficiency` (shared row names, KV bytes)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from efficiency import kv_bytes, method_rows  # noqa: E402

from dpn.compressors import format_path  # noqa: E402

GEOMETRIES = ("llava-1.5-7b", "llava-1.5-13b", "llava-hr-7b", "llava-hr-x-13b")
TINY = ("tiny", "llava-hr-tiny")
ATTENTIONS = ("sdpa", "flash_attention_2")
METHODS = ("none", "static", "dpn", "fastv", "pdrop")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (tiny geometry, the test)")
    p.add_argument("--geometry", default=None,
                   help=f"comma-separated of {', '.join(GEOMETRIES)}, 'all' (those four) or 'tiny' "
                        "(default: all on cuda, tiny on cpu)")
    p.add_argument("--dtype", default=None, help="bfloat16 | float32 (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--attn", default="sdpa", help=f"comma-separated of {', '.join(ATTENTIONS)}")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--paths", default="4-2-1;2-2-2;1-1-1", help="fixed DPN paths, ';'-separated")
    p.add_argument("--budgets", default="0.5;0.7", help="emulated DPN budgets (fraction of the baseline's LLM "
                   "prefill FLOPs), ';'-separated; '' for none")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)} (none is required)")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens per prompt")
    p.add_argument("--warmup", type=int, default=2, help="untimed prefills per row before timing")
    p.add_argument("--repeats", type=int, default=None, help="timed prefills per row (default 20 on cuda, 3 on cpu)")
    p.add_argument("--decode-tokens", type=int, default=None, help="greedy decode steps (default 32 cuda, 4 cpu)")
    p.add_argument("--decode-repeats", type=int, default=None, help="timed decodes per row (default 3 cuda, 1 cpu)")
    p.add_argument("--markdown", default=None, help="also write the tables, command and device to this file")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if args.device not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {args.device!r}")
    geometry = args.geometry or ("all" if cuda else "tiny")
    args.geometries = list(GEOMETRIES) if geometry == "all" else list(TINY) if geometry == "tiny" else geometry.split(",")
    bad = [g for g in args.geometries if g not in GEOMETRIES + TINY]
    if bad:
        p.error(f"--geometry: unknown {bad}; choose from {', '.join(GEOMETRIES)}, all or tiny")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.dtype not in ("bfloat16", "float32"):
        p.error(f"--dtype must be bfloat16 or float32, got {args.dtype!r}")
    args.attn = args.attn.split(",")
    if any(a not in ATTENTIONS for a in args.attn):
        p.error(f"--attn must be among {','.join(ATTENTIONS)}, got {args.attn}")
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        args.paths = [[int(f) for f in path.replace(",", "-").split("-")] for path in args.paths.split(";") if path]
        args.budgets = [float(b) for b in args.budgets.split(";") if b]
    except ValueError:
        p.error("--batch-sizes like 1,8, --paths like 4-2-1;2-2-2 and --budgets like 0.5;0.7")
    if min(args.batch_sizes) < 1 or any(not 0 < b <= 1 for b in args.budgets):
        p.error(f"batch sizes must be >= 1 and budgets in (0, 1], got {args.batch_sizes}, {args.budgets}")
    args.methods = args.methods.split(",")
    if "none" not in args.methods or any(m not in METHODS for m in args.methods):
        p.error(f"--methods must be a subset of {','.join(METHODS)} including none, got {args.methods}")
    args.repeats = args.repeats or (20 if cuda else 3)
    args.decode_tokens = args.decode_tokens or (32 if cuda else 4)
    args.decode_repeats = args.decode_repeats or (3 if cuda else 1)
    if min(args.repeats, args.decode_tokens, args.decode_repeats) < 1 or args.warmup < 0 or args.text_tokens < 6:
        p.error("--repeats, --decode-tokens, --decode-repeats must be >= 1, --warmup >= 0, --text-tokens >= 6")
    return args


# ----- budgets on random routers -------------------------------------------------------------------------
def path_fractions(cfg, n_text: int) -> dict[tuple[int, ...], float]:
    """Every routing path -> its LLM prefill FLOPs (exact convention) as a fraction of the baseline's."""
    import itertools

    from dpn.flops import analytic_token_counts, flops_report

    out = {}
    for path in itertools.product(cfg.expert_factors, repeat=len(cfg.dpe_layers)):
        vis, txt = analytic_token_counts(cfg, n_text, list(path), "dpn")
        rep = flops_report(cfg, vis, txt)
        out[path] = rep["tflops_exact"] / rep["baseline_tflops_exact"]
    return out


def budget_mix(fractions: dict[tuple[int, ...], float], budget: float, n: int) -> list[tuple[int, ...]]:
    """`n` paths whose mean FLOPs fraction is as close to `budget` as n samples allow: the cheapest path at
    or above the budget and the dearest below it, mixed in the proportion that hits it (a budget outside
    the reachable range takes the nearest end)."""
    ranked = sorted(fractions.items(), key=lambda kv: kv[1])
    above = [p for p in ranked if p[1] >= budget]
    below = [p for p in ranked if p[1] < budget]
    if not above:
        return [ranked[-1][0]] * n
    if not below:
        return [ranked[0][0]] * n
    (hi, f_hi), (lo, f_lo) = above[0], below[-1]
    k = round(n * (f_hi - budget) / (f_hi - f_lo))  # samples on the cheaper path
    return [lo] * k + [hi] * (n - k)


# ----- one geometry ---------------------------------------------------------------------------------------
def build(name: str, dtype, device, attn: str):
    import torch

    from dpn.modeling_dpn import DPNForConditionalGeneration
    from dpn.presets import get_preset

    cfg = get_preset(name, compressor="dpn")
    cfg.text_config._attn_implementation = attn
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = DPNForConditionalGeneration(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    for r in model.routers.values():  # irrelevant to forced paths; a non-uniform gate as a trained one has
        torch.nn.init.normal_(r.fc2.weight, std=1.0)
    return model


def inputs(cfg, batch: int, n_text: int, device, dtype):
    """(ids (B, L), pixels (B, 3, S, S), route_index (B,)): B copies of an LLaVA-style prompt, distinct images."""
    import torch

    pre = 5  # "<s> USER: " and the like, the image, then the question and "ASSISTANT:"
    vocab = cfg.text_config.vocab_size
    ids = [1] + [(100 + i) % vocab for i in range(pre - 1)] + [cfg.image_token_id] * cfg.num_image_tokens
    ids += [(200 + i) % vocab for i in range(n_text - pre)]
    size = cfg.vision_config.image_size
    g = torch.Generator().manual_seed(batch)
    pixels = torch.randn(batch, 3, size, size, generator=g).to(device=device, dtype=dtype)
    ids_t = torch.tensor([ids] * batch, device=device)
    return ids_t, pixels, torch.full((batch,), ids_t.shape[1] - 1, device=device)


def rows_for(cfg, args, fractions) -> list[dict]:
    rows = method_rows(cfg, args.paths, args.methods)
    if "dpn" in args.methods:
        for b in args.budgets:
            rows.append(dict(name=f"dpn budget {b:g} (emulated)", compressor="dpn", path=None, budget=b,
                             mix=budget_mix(fractions, b, max(args.batch_sizes))))
    return rows


def force_for(cfg, row: dict, batch: int, step: int, device):
    """(B, n_dpe) expert indices of a row's batch: its fixed path, or its budget mix (batch 1 cycles it)."""
    import torch

    if row.get("mix"):
        mix = row["mix"]
        paths = [mix[(step + i) % len(mix)] for i in range(batch)] if batch < len(mix) else list(mix[:batch])
        paths += [mix[i % len(mix)] for i in range(len(paths), batch)]
    elif row["path"] is not None:
        paths = [row["path"]] * batch
    else:
        return None
    return torch.tensor([[cfg.expert_index(f) for f in p] for p in paths], device=device)


class Cell:
    """One (row, batch size) of a geometry: its inputs, its timings so far, or the error that stopped it."""

    def __init__(self, model, row: dict, batch: int, args, device, dtype):
        self.model, self.row, self.batch = model, row, batch
        self.ids, self.pixels, self.route_index = inputs(model.config, batch, args.text_tokens, device, dtype)
        self.device = device
        self.ttft: list[float] = []
        self.decode: list[float] = []
        self.peak: float | None = None
        self.flops: list[float] = []
        self.kv = 0
        self.error: str | None = None

    def prefill(self, step: int):
        cfg = self.model.config
        cfg.compressor = self.row["compressor"]
        kwargs = dict(pixel_values=self.pixels, use_cache=True, logits_to_keep=1, route_index=self.route_index)
        force = force_for(cfg, self.row, self.batch, step, self.device)
        if force is not None:
            kwargs["force_path"] = force
        out = self.model(self.ids, **kwargs)
        return out, out.logits[:, -1].argmax(-1)

    def result(self, args) -> dict:
        if self.error:
            return dict(method=self.row["name"], batch=self.batch, error=self.error)
        per_seq = args.decode_tokens / statistics.median(self.decode)
        ranked = sorted(self.ttft)
        p99 = ranked[min(len(ranked) - 1, math.ceil(0.99 * len(ranked)) - 1)]
        mix = self.row.get("mix") or ([self.row["path"]] if self.row["path"] is not None else None)
        return dict(method=self.row["name"], batch=self.batch, ttft_ms_p50=statistics.median(self.ttft) * 1e3,
                    ttft_ms_p99=p99 * 1e3, ttft_ms_all=[t * 1e3 for t in self.ttft],
                    decode_tokens_per_s=per_seq * self.batch, decode_tokens_per_s_per_seq=per_seq,
                    peak_memory_gib=self.peak, kv_cache_mib=self.kv / 2**20,
                    llm_prefill_tflops_exact_mean=sum(self.flops) / len(self.flops),
                    paths=None if mix is None else [format_path(p) for p in mix])


def measure(cells: list[Cell], args) -> None:
    """Warm-up, then `--repeats` passes of one timed prefill per cell and `--decode-repeats` passes of one
    prefill + timed decode per cell: the cells are interleaved, so drift in clocks or in other load on the
    host hits every row alike. A cell that runs out of memory records it and drops out."""
    import torch

    from dpn.flops import per_sample_tflops

    cuda = cells[0].device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def each(fn) -> None:
        for cell in cells:
            if cell.error:
                continue
            try:
                with torch.no_grad():
                    fn(cell)
            except torch.cuda.OutOfMemoryError as e:  # record and go on: one row must not lose the run
                cell.error = f"out of memory: {str(e).splitlines()[0]}"
                torch.cuda.empty_cache()

    for s in range(args.warmup):
        each(lambda c, s=s: c.prefill(s))

    def timed_prefill(cell: Cell, step: int) -> None:
        sync()
        t0 = time.perf_counter()
        out, _ = cell.prefill(step)
        sync()
        cell.ttft.append(time.perf_counter() - t0)
        if not cell.flops:
            cfg = cell.model.config
            cell.flops = per_sample_tflops(cfg.text_config, out.visual_tokens_per_layer, out.text_tokens_per_layer,
                                           "exact")
            cell.kv = kv_bytes(out.cache)

    def timed_decode(cell: Cell, step: int) -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        out, nxt = cell.prefill(step)
        cache = out.cache
        sync()
        t0 = time.perf_counter()
        for _ in range(args.decode_tokens):
            nxt = cell.model(nxt[:, None], cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1)
        sync()
        cell.decode.append(time.perf_counter() - t0)
        if cuda:
            cell.peak = max(cell.peak or 0.0, torch.cuda.max_memory_allocated() / 2**30)

    for s in range(args.repeats):
        each(lambda c, s=s: timed_prefill(c, s))
    for s in range(args.decode_repeats):
        each(lambda c, s=s: timed_decode(c, s))


def run_geometry(name: str, attn: str, args) -> dict:
    import torch

    cuda = args.device == "cuda"
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    if attn == "flash_attention_2":
        why = ("the DPN forward passes 4-D additive attention masks (dpn/modeling_dpn.py `_attention_mask`), which "
               "transformers' flash-attention-2 path cannot take")
        if importlib.util.find_spec("flash_attn") is None:
            why = "flash-attn is not installed"
        return dict(geometry=name, attention=attn, unsupported=why, rows=[])
    model = build(name, dtype, device, attn)
    build_s = time.perf_counter() - t0
    cfg = model.config
    fractions = path_fractions(cfg, args.text_tokens)
    cells = [Cell(model, row, batch, args, device, dtype) for row in rows_for(cfg, args, fractions)
             for batch in args.batch_sizes]
    measure(cells, args)
    results = [c.result(args) for c in cells]
    for r in results:
        print(f"[{name} {attn}] {_row_line(r)}", file=sys.stderr, flush=True)
    base = {r["batch"]: r for r in results if r["method"] == "baseline" and "error" not in r}
    for r in results:
        b = base.get(r["batch"])
        if "error" not in r and b:
            r["ttft_saving"] = 1 - r["ttft_ms_p50"] / b["ttft_ms_p50"]
            r["flops_saving"] = 1 - r["llm_prefill_tflops_exact_mean"] / b["llm_prefill_tflops_exact_mean"]
            r["decode_speedup"] = r["decode_tokens_per_s"] / b["decode_tokens_per_s"]
    tc = cfg.text_config
    info = dict(geometry=name, attention=attn, device=args.device, dtype=args.dtype,
                gpu=torch.cuda.get_device_name() if cuda else None, layers=tc.num_hidden_layers, hidden=tc.hidden_size,
                visual_tokens=cfg.num_image_tokens, text_tokens=args.text_tokens, image_size=cfg.vision_config.image_size,
                dpe_layers=cfg.dpe_layers, build_s=build_s, seconds=time.perf_counter() - t0, rows=results,
                path_flops_fractions={format_path(p): f for p, f in fractions.items()})
    del model, cells
    if cuda:
        torch.cuda.empty_cache()
    return info


def _row_line(r: dict) -> str:
    if "error" in r:
        return f"{r['method']} b={r['batch']}: {r['error']}"
    mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f} GiB"
    return (f"{r['method']} b={r['batch']}: TTFT p50 {r['ttft_ms_p50']:.1f} ms p99 {r['ttft_ms_p99']:.1f} ms, "
            f"decode {r['decode_tokens_per_s']:.1f} tok/s, peak {mem}")


def fmt_table(g: dict) -> str:
    head = f"### {g['geometry']} ({g['attention']}"
    if g.get("unsupported"):
        return head + f"): not measured: {g['unsupported']}\n"
    lines = [head + f"; {g['gpu'] or g['device']}, {g['dtype']}, {g['visual_tokens']} visual + {g['text_tokens']} "
             f"text tokens, {g['image_size']}-px images, {g['layers']} LLM layers, DPE {g['dpe_layers']}; model build "
             f"{g['build_s']:.0f} s, rows {g['seconds'] - g['build_s']:.0f} s)", "",
             "| method | batch | TTFT p50 ms | TTFT p99 ms | TTFT saving | LLM FLOPs saving | decode tok/s (batch) | "
             "decode vs none | peak GiB | KV MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in g["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['batch']} | {r['error']} | | | | | | | |")
            continue
        mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        lines.append(f"| {r['method']} | {r['batch']} | {r['ttft_ms_p50']:.1f} | {r['ttft_ms_p99']:.1f} | "
                     f"{r.get('ttft_saving', 0):.1%} | {r.get('flops_saving', 0):.1%} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r.get('decode_speedup', 1):.2f}x | {mem} | {r['kv_cache_mib']:.1f} |")
    mixes = {r["method"]: r["paths"] for r in g["rows"] if "budget" in r["method"] and r.get("paths")}
    for name, paths in mixes.items():
        lines.append(f"\n{name}: path mix {', '.join(paths)}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/latency.py: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    geometries = [run_geometry(g, a, args) for g in args.geometries for a in args.attn]
    tables = "\n".join(fmt_table(g) for g in geometries)
    print(tables)
    wall = time.perf_counter() - t_start
    load = (load_before, os.getloadavg()[0])
    if args.markdown:
        cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
        dev = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()} CPU, {os.cpu_count()} cores"
        Path(args.markdown).write_text(
            f"# Latency benchmark (measured)\n\nGenerated by `bench/latency.py` (see its docstring). Command: `{cmd}`\n\n"
            f"Device: {dev}; torch {torch.__version__}; whole run {wall:.0f} s; host load average (1 min) before / "
            f"after {load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} cores.\n\n{tables}")
    print(json.dumps(dict(device=args.device, torch=torch.__version__, wall_s=wall, load_avg=load,
                          geometries=geometries)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
