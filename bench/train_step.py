"""Training step time of DPN against the uncompressed LLaVA-1.5 baseline, same geometry, one process.

    .venv/bin/python bench/train_step.py --markdown bench/RESULTS_train.md        # CPU, a few minutes

Why it can differ at all: the reference implementation pads pooled sequences back to full length in
training, so its training saves no compute. Our model re-pads each pyramid stage to its own (shorter)
length, so the decoder layers after each DPE run on fewer tokens in the backward pass too.

What one step is: what each Ray/DeepSpeed worker does per micro-batch in stage 2, without the
communication: forward with labels (LM loss + routing loss), backward, AdamW step on the stage-2
trainable parameters (LLM, projector, routers; the vision tower frozen). The geometry is the one of
`bench/efficiency.py` (12 layers, d=1024, FFN 2816, 32k vocabulary, 576 visual tokens from a small CLIP
stand-in) with random weights, `--batch` image samples of 576 visual + `--text-tokens` text tokens each,
the last `--answer-tokens` supervised. One model serves every method (its `config.compressor` is
switched), the methods are interleaved in every repeat so machine-load drift hits all alike, and the
median of `--repeats` is reported. Rows:
    baseline        compressor "none": every layer sees 576 visual tokens
    static 4,2,1    fixed pyramid (no router)
    dpn routed      fresh routers sample the path per sample, as at the start of stage 2
    dpn 4,2,1       routers run, the path is forced (the strongest compression the paper reports)

FLOPs are the exact decoder-layer FLOPs of the forward pass from the model's own per-layer token counts
(`dpn.flops`, "exact" convention); a training step costs about 3x that for every method alike, so the
saving is the same. `time / FLOPs saving` says how much of the FLOPs saving became wall time.

Prints the table, then one JSON object as the last stdout line.
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

ROWS = (
    ("baseline", "none", None),
    ("static 4,2,1", "static", None),
    ("dpn routed", "dpn", None),
    ("dpn 4,2,1 (forced)", "dpn", (4, 2, 1)),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per method (median reported)")
    p.add_argument("--batch", type=int, default=2, help="image samples per micro-batch")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens per sample")
    p.add_argument("--answer-tokens", type=int, default=16, help="supervised tokens at the end of each sample")
    p.add_argument("--layers", type=int, default=None, help="override the geometry's layer count (default 12)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", default=None, help="also write the table and the command to this file")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.batch < 1 or args.answer_tokens < 1 or args.text_tokens <= args.answer_tokens:
        p.error("need --repeats >= 1, --batch >= 1, 1 <= --answer-tokens < --text-tokens")
    return args


def geometry(layers: int | None):
    """The mid-size geometry shared with the inference benchmark."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from efficiency import mid_config

    return mid_config(layers)


def inputs(cfg, batch: int, n_text: int, n_answer: int, seed: int):
    """(input_ids, labels, pixel_values) of `batch` image samples: bos + 4 prompt tokens + image + text."""
    import torch

    from dpn.constants import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    pre = [1, 100, 101, 102, 103]
    text = torch.randint(200, 30000, (batch, n_text), generator=g)
    image = torch.full((batch, cfg.num_image_tokens), cfg.image_token_id)
    ids = torch.cat([torch.tensor([pre] * batch), image, text], dim=1)  # (B, 5 + 576 + n_text)
    labels = ids.clone()
    labels[:, : ids.shape[1] - n_answer] = IGNORE_INDEX
    size = cfg.vision_config.image_size
    return ids, labels, torch.randn(batch, 3, size, size, generator=g)


def one_step(model, optimizer, ids, labels, pixels, force_path):
    """(forward+backward seconds, optimizer seconds, model output) of one training step."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    fp = None if force_path is None else torch.tensor([force_path] * ids.shape[0])
    out = model(input_ids=ids, pixel_values=pixels, labels=labels, force_path=fp)
    out.loss.backward()
    t1 = time.perf_counter()
    optimizer.step()
    return t1 - t0, time.perf_counter() - t1, out


def run(args) -> dict:
    import torch

    from dpn.flops import llm_prefill_flops
    from dpn.modeling_dpn import DPNForConditionalGeneration

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = geometry(args.layers)
    model = DPNForConditionalGeneration(cfg).train()
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("vision_tower."))  # stage 2: vision tower frozen
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids, labels, pixels = inputs(cfg, args.batch, args.text_tokens, args.answer_tokens, args.seed)
    factor_index = {f: i for i, f in enumerate(cfg.expert_factors)}
    tc = cfg.text_config

    def step(row):
        _, compressor, path = row
        model.config.compressor = compressor
        force = None if path is None else [factor_index[f] for f in path]
        return one_step(model, optimizer, ids, labels, pixels, force)

    for row in ROWS:  # warm-up (allocator, kernels), not timed
        step(row)
    times: dict[str, list[tuple[float, float]]] = {r[0]: [] for r in ROWS}
    flops: dict[str, list[float]] = {r[0]: [] for r in ROWS}
    tokens: dict[str, list[list[float]]] = {r[0]: [] for r in ROWS}
    t_all = time.perf_counter()
    for _ in range(args.repeats):
        for row in ROWS:
            fb, opt, out = step(row)
            times[row[0]].append((fb, opt))
            n = (out.visual_tokens_per_layer + out.text_tokens_per_layer).tolist()
            flops[row[0]].append(sum(llm_prefill_flops(tc, s, "exact") for s in n) / len(n))
            tokens[row[0]].append(out.visual_tokens_per_layer.float().mean(0).tolist())
    wall = time.perf_counter() - t_all

    base = ROWS[0][0]
    base_step = statistics.median(fb + o for fb, o in times[base])
    base_fb = statistics.median(fb for fb, _ in times[base])
    base_flops = statistics.mean(flops[base])
    rows = []
    for name, _, _ in ROWS:
        step_s = statistics.median(fb + o for fb, o in times[name])
        fb_s = statistics.median(fb for fb, _ in times[name])
        f = statistics.mean(flops[name])
        flops_saving = 1 - f / base_flops
        rows.append({
            "method": name,
            # Mean over the samples of all timed steps (routed paths differ from step to step).
            "visual_tokens_per_layer": [round(statistics.mean(col)) for col in zip(*tokens[name], strict=True)],
            "forward_gflops_per_sample": f / 1e9,
            "flops_saving": flops_saving,
            "step_s": step_s,
            "fwd_bwd_s": fb_s,
            "optimizer_s": statistics.median(o for _, o in times[name]),
            "step_ratio_vs_baseline": step_s / base_step,
            "fwd_bwd_ratio_vs_baseline": fb_s / base_fb,
            "time_saving_over_flops_saving": ((1 - fb_s / base_fb) / flops_saving) if flops_saving > 0 else None,
            "step_s_all": [round(a + b, 4) for a, b in times[name]],
        })
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "geometry": {"layers": tc.num_hidden_layers, "hidden": tc.hidden_size, "ffn": tc.intermediate_size,
                     "vocab": tc.vocab_size, "visual_tokens": cfg.num_image_tokens, "text_tokens": args.text_tokens,
                     "batch": args.batch, "dpe_layers": cfg.dpe_layers, "trainable_params": n_params},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "repeats": args.repeats,
        "wall_s": wall,
        "rows": rows,
    }


def compress_tokens(tokens: list[int]) -> str:
    """[576, 576, 144, 144] -> "576x2 144x2"."""
    out, prev, count = [], None, 0
    for t in tokens + [None]:
        if t == prev:
            count += 1
            continue
        if prev is not None:
            out.append(f"{prev}x{count}")
        prev, count = t, 1
    return " ".join(out)


def table(res: dict) -> str:
    g = res["geometry"]
    lines = [
        f"Geometry: {g['layers']} layers, d={g['hidden']}, FFN {g['ffn']}, vocab {g['vocab']}, "
        f"{g['visual_tokens']} visual + {g['text_tokens']} text tokens, batch {g['batch']}, DPE layers "
        f"{g['dpe_layers']}, {g['trainable_params'] / 1e6:.0f}M trainable parameters, fp32.",
        f"Machine: {res['machine']}. Median of {res['repeats']} interleaved steps per method; "
        f"timed part {res['wall_s']:.0f} s.",
        "",
        "| method | visual tokens per layer | fwd GFLOPs/sample (exact) | FLOPs saving | step s (fwd+bwd+AdamW) "
        "| fwd+bwd s | step time DPN/baseline | fwd+bwd time / baseline | time saving / FLOPs saving |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["rows"]:
        eff = "-" if r["time_saving_over_flops_saving"] is None else f"{r['time_saving_over_flops_saving']:.2f}"
        lines.append(
            f"| {r['method']} | {compress_tokens(r['visual_tokens_per_layer'])} | {r['forward_gflops_per_sample']:.1f} "
            f"| {r['flops_saving']:.1%} | {r['step_s']:.2f} | {r['fwd_bwd_s']:.2f} | {r['step_ratio_vs_baseline']:.2f} "
            f"| {r['fwd_bwd_ratio_vs_baseline']:.2f} | {eff} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    res = run(args)
    text = table(res)
    print(text)
    if args.markdown:
        cmd = "python bench/train_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.markdown).write_text(f"# Training step time: DPN vs baseline\n\nCommand: `{cmd.strip()}`\n\n{text}\n")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
