"""Equal-FLOPs comparison of DPN with its controls and peers on a finished pipeline work dir (issue #18, 5).

    .venv/bin/python bench/pareto.py --work-dir W                                    # 1,200 questions
    .venv/bin/python bench/pareto.py --work-dir /work/exp/w1 --out-dir /tmp/pareto-w1  # a work dir not ours
    .venv/bin/python bench/pareto.py --work-dir W --budgets 0.45,0.6,0.75 --data-root DIR/eval --no-mlflow
    .venv/bin/python bench/pareto.py --work-dir W --dpn-model CAL --out-dir /tmp/p   # a dpn calibrated elsewhere

Points, every one on the same questions, with LLM prefill TFLOPs per sample measured from each sample's
real per-layer token counts (FastV convention, `dpn.flops`):
    dpn           the calibrated checkpoint (step route_calibrate) at each `--budgets` value (default: 25/50/75%
                  of its reachable range) and at its saved budget ("saved"; route_bias when none was saved).
    static        the same weights and prompts on every fixed path (27 for 3 DPEs x 3 experts), forced with
                  `predict(path=...)`.
    random        the same weights with compressor "random", `random_path_shares` = the path shares DPN
                  measured at that budget. NB: `predict` appends `<ROUTER>` for compressor "dpn" only and the
                  random compressor does not scale pooled tokens by the router's p[chosen] (the reference
                  objective does), so this control sees prompts / activations its weights were not trained on.
    random_paths  the control without that confound: each question gets a path drawn from the same shares
                  and is answered on that path with DPN's own prompts, i.e. its answer is the `static` run's
                  on the drawn path (no extra forward pass). `random` - `random_paths` measures the confound.
    fastv, pdrop  the uncompressed variant (step stage2_none) at the ratio whose analytic TFLOPs
                  (`dpn.flops.analytic_token_counts` over the benchmark's text lengths) match each DPN point's
                  measured mean; the achieved (measured) TFLOPs are reported, and a target the method cannot
                  reach with its layer setting (e.g. FastV's K = `fastv_layer`) is flagged `matched: false`.
                  `--fastv-layer K` overrides FastV's K (FastV prunes after 2 of 32 layers; the tiny
                  preset's checkpoints keep that K = 2, half of their 4 layers).
    none          the uncompressed variant.
Each point also carries `equiv_visual_tokens_576`: visual tokens per decoder layer averaged over layers (and
samples), scaled so the uncompressed grid counts 576: the unit of the FastV / PDrop / VisionZip tables
("64 / 128 / 192 of 576"); LLaVA-1.5 uncompressed = 576, static 4-2-1 at 7B = (576 + 144 + 72 + 72) / 4 = 216.

Evaluation set: by default `--n-eval` (1,200) questions freshly generated with the work dir's synthetic-corpus
generator config (seed included, `pipelines.synth`) into `OUT/eval-N` (reused on a re-run). The generator
shuffles its whole question plan, so this set is NOT an extension of the demo's 300-question benchmark: its
first 300 questions differ from the demo's (checked: none of the first 30 of n_eval=60 equals n_eval=30's,
and no image repeats). It is an independent draw from the same distribution, held out from training like the
demo's. `--data-root DIR` uses an existing eval root (`DIR/synthetic/`) instead, limited to `--n-eval`.

Intervals: 95% percentile bootstrap over questions (`scipy.stats.bootstrap`, 2,000 resamples, fixed seed).
Verdict, per DPN point: "on or above the frontier" of static / random / random_paths / fastv / pdrop when no such
point with TFLOPs <= DPN's (within `--flops-tol`, matched points are never exactly equal) has an accuracy
above DPN's ci95 upper bound; the strict comparison (any such point with a higher point estimate) is reported
too, and so is the paired-bootstrap 95% interval of DPN's accuracy minus the best such competitor's. That best
competitor is the maximum over up to ~40 noisy points, so its accuracy is optimistic (winner's curse): a paired
interval below 0 against it is a warning sign, not a test; the ci95 rule is the verdict.

Runtime: one process, `--threads` torch threads (default 1: on this shared 2-core machine, busy with other jobs,
32 questions took 1.7 s with one thread and 13 s with two), batch 16, 4 new tokens. A point is one pass over
the questions: 42 passes on the tiny preset (27 static paths of which 25 differ: see `effective_path`).
Measured here on the demo's checkpoints (tiny preset; stage2_none of /work/exp/w1, a counterfactual stage-2
dpn calibrated with the pipeline's defaults): 1,200 questions 28.6 min wall / 9.1 min CPU (the busy machine
gave the process about a third of a core), 300 questions 7.5 min wall; ci95 half-widths ~2.7 / ~5.5 points.

Output: progress and a table on stderr, `OUT/pareto.json` and `OUT/pareto.png`, one MLflow run "pareto" in
the work dir's store (`--no-mlflow` skips it), and the JSON as the last stdout line. OUT = `--out-dir`,
default `W/bench/pareto` (pass another one for a work dir you must not write into).
Bad input (missing work dir or step, bad `--budgets`, a budget outside the reachable range) exits 2 with one line.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Methods in table order; the competitors are what DPN is judged against (`none` is the reference point).
METHODS = ("dpn", "static", "random", "random_paths", "fastv", "pdrop", "none")
COMPETITORS = ("static", "random", "random_paths", "fastv", "pdrop")
LLAVA_VISUAL_TOKENS = 576  # LLaVA-1.5's 24 x 24 grid: the unit peers report token budgets in
RATIO_FIELD = {"fastv": "fastv_ratio", "pdrop": "pdrop_ratio"}
DEFAULT_QUANTILES = (0.25, 0.5, 0.75)
BOOTSTRAP_RESAMPLES = 2000


class BadInput(Exception):
    """Bad command-line input or work dir: reported as one line, exit status 2."""


# ----- statistics ----------------------------------------------------------------------------------
def bootstrap_ci(hits: Sequence[float], seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """95% percentile-bootstrap interval (in percent) of the mean of per-question scores `hits` (0/1, or
    paired differences)."""
    import numpy as np
    from scipy.stats import bootstrap

    x = np.asarray(hits, dtype=float)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one question")
    if np.all(x == x[0]):  # every resample has the same mean; scipy warns on degenerate data
        return 100.0 * float(x[0]), 100.0 * float(x[0])
    res = bootstrap((x,), np.mean, n_resamples=resamples, confidence_level=0.95, method="percentile",
                    random_state=np.random.default_rng(seed))
    return 100.0 * float(res.confidence_interval.low), 100.0 * float(res.confidence_interval.high)


def paired_diff_ci(a: Sequence[float], b: Sequence[float], seed: int = 0,
                   resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """95% percentile-bootstrap interval (points) of mean(a) - mean(b), questions resampled jointly (the
    bootstrap of the per-question differences)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_diff_ci needs two equally long, non-empty score lists, got {len(a)} and {len(b)}")
    return bootstrap_ci([x - y for x, y in zip(a, b, strict=True)], seed=seed, resamples=resamples)


# ----- token and FLOPs arithmetic --------------------------------------------------------------------
def equiv_visual_tokens_576(visual_per_layer: Sequence[Sequence[int]], num_image_tokens: int) -> float:
    """Layer-averaged visual tokens in LLaVA-1.5's unit: for each sample the mean over decoder layers of its
    visual tokens, scaled by 576 / the uncompressed grid (`num_image_tokens`); averaged over samples."""
    rows = [list(r) for r in visual_per_layer]
    if not rows or any(not r for r in rows):
        raise ValueError("equiv_visual_tokens_576 needs at least one sample with one count per layer")
    if num_image_tokens <= 0:
        raise ValueError(f"num_image_tokens must be > 0, got {num_image_tokens}")
    scale = LLAVA_VISUAL_TOKENS / num_image_tokens
    return sum(scale * sum(r) / len(r) for r in rows) / len(rows)


def analytic_mean_tflops(config, compressor: str, text_lengths: Sequence[int], path: Sequence[int] | None = None,
                         **fields: float) -> float:
    """Mean LLM prefill TFLOPs (FastV convention) over samples with `text_lengths` text tokens and one image
    each, from `dpn.flops.analytic_token_counts` with config `fields` overridden (e.g. fastv_ratio=0.6)."""
    from dpn.flops import TERA, analytic_token_counts, llm_prefill_flops

    if not text_lengths:
        raise ValueError("analytic_mean_tflops needs at least one text length")
    cfg = copy.deepcopy(config)
    for name, value in fields.items():
        setattr(cfg, name, value)
    total = 0.0
    for n_text, count in Counter(int(n) for n in text_lengths).items():
        vis, txt = analytic_token_counts(cfg, n_text, path, compressor)
        total += count * llm_prefill_flops(cfg.text_config, [v + t for v, t in zip(vis, txt, strict=True)])
    return total / len(text_lengths) / TERA


@dataclass(kw_only=True)
class RatioMatch:
    """The ratio of a drop-by-ratio peer whose analytic TFLOPs come nearest a target."""

    method: str
    ratio: float  # fastv_ratio (share dropped) or pdrop_ratio (share kept per drop layer)
    target_tflops: float
    predicted_tflops: float
    reachable_tflops: tuple[float, float]  # (least, most) over the ratio's domain
    matched: bool  # predicted within `tol` (relative) of the target


def solve_ratio(config, method: str, target_tflops: float, text_lengths: Sequence[int], tol: float = 0.01,
                iters: int = 50) -> RatioMatch:
    """fastv_ratio / pdrop_ratio at which `method`'s mean analytic prefill TFLOPs over `text_lengths` is
    nearest `target_tflops` (bisection: FLOPs fall monotonically from the gentle end of the ratio's domain
    to the aggressive one, in steps of one token). A target outside the reachable range gets the nearest
    end and `matched=False`."""
    if method not in RATIO_FIELD:
        raise ValueError(f"solve_ratio matches {sorted(RATIO_FIELD)}, got {method!r}")
    if not (isinstance(target_tflops, int | float) and math.isfinite(target_tflops) and target_tflops > 0):
        raise ValueError(f"target_tflops must be a positive number, got {target_tflops!r}")
    name = RATIO_FIELD[method]
    # fastv_ratio is the share dropped, in [0, 1); pdrop_ratio the share kept, in (0, 1].
    gentle, aggressive = (0.0, 1.0 - 1e-9) if method == "fastv" else (1.0, 1e-9)

    def f(r: float) -> float:
        return analytic_mean_tflops(config, method, text_lengths, **{name: r})

    most, least = f(gentle), f(aggressive)
    if target_tflops >= most:
        best, pred = gentle, most
    elif target_tflops <= least:
        best, pred = aggressive, least
    else:
        a, b, fa, fb = gentle, aggressive, most, least  # invariant: fa > target >= fb
        for _ in range(iters):
            mid = (a + b) / 2
            fm = f(mid)
            if fm > target_tflops:
                a, fa = mid, fm
            else:
                b, fb = mid, fm
        best, pred = (a, fa) if abs(fa - target_tflops) < abs(fb - target_tflops) else (b, fb)
    return RatioMatch(method=method, ratio=best, target_tflops=float(target_tflops), predicted_tflops=pred,
                      reachable_tflops=(least, most), matched=abs(pred - target_tflops) <= tol * target_tflops)


# ----- frontier and verdict ----------------------------------------------------------------------------
def frontier(points: Sequence[Mapping[str, Any]], methods: Sequence[str] = COMPETITORS) -> list[dict[str, Any]]:
    """The Pareto frontier (fewer TFLOPs, higher accuracy) of the points of `methods`, by TFLOPs."""
    from pipelines.evaluate import _pareto_front

    pool = [p for p in points if p["method"] in methods]
    front = _pareto_front([(p["tflops"], p["accuracy"]) for p in pool])
    out = []
    for x, y in front:
        p = next(q for q in pool if (q["tflops"], q["accuracy"]) == (x, y))
        out.append({"method": p["method"], "label": p["label"], "tflops": x, "accuracy": y})
    return out


def verdict(points: Sequence[Mapping[str, Any]], flops_tol: float = 0.01,
            hits: Mapping[str, Sequence[float]] | None = None, seed: int = 0) -> dict[str, Any]:
    """For every dpn point: whether it is on or above the competitors' frontier.

    A competitor counts against a dpn point when its TFLOPs are <= the dpn point's times (1 + flops_tol).
    `on_or_above_frontier`: no counting competitor is above the dpn point's ci95 upper bound; `strict`: none
    is above its point estimate. With `hits` (point key "method/label" -> per-question scores, same question
    order), the paired-bootstrap interval of dpn minus the best counting competitor is added."""
    out: dict[str, Any] = {"flops_tol": flops_tol, "competitors": list(COMPETITORS), "points": {}}
    rivals = [p for p in points if p["method"] in COMPETITORS]
    for d in (p for p in points if p["method"] == "dpn"):
        cheaper = [c for c in rivals if c["tflops"] <= d["tflops"] * (1.0 + flops_tol)]
        above_ci = [c for c in cheaper if c["accuracy"] > d["ci95"][1]]
        above_pt = [c for c in cheaper if c["accuracy"] > d["accuracy"]]
        entry: dict[str, Any] = {
            "budget": d.get("budget"), "tflops": d["tflops"], "accuracy": d["accuracy"], "ci95": d["ci95"],
            "on_or_above_frontier": not above_ci,
            "beaten_beyond_ci_by": [f"{c['method']}/{c['label']}" for c in above_ci],
            "strict_on_or_above": not above_pt,
            "beaten_by_point_estimate": [f"{c['method']}/{c['label']}" for c in above_pt],
            "competitors_at_or_below_flops": len(cheaper),
        }
        if cheaper:
            best = max(cheaper, key=lambda c: (c["accuracy"], -c["tflops"]))
            entry["best_competitor"] = {"point": f"{best['method']}/{best['label']}", "tflops": best["tflops"],
                                        "accuracy": best["accuracy"], "ci95": best["ci95"],
                                        "dpn_minus_best": d["accuracy"] - best["accuracy"]}
            key_d, key_b = f"dpn/{d['label']}", f"{best['method']}/{best['label']}"
            if hits is not None and key_d in hits and key_b in hits:
                entry["best_competitor"]["dpn_minus_best_ci95_paired"] = list(
                    paired_diff_ci(hits[key_d], hits[key_b], seed=seed))
        out["points"][d["label"]] = entry
    entries = out["points"].values()
    n, on, strict = len(entries), sum(e["on_or_above_frontier"] for e in entries), sum(
        e["strict_on_or_above"] for e in entries)
    out["text"] = (f"DPN is on or above the frontier of {'/'.join(COMPETITORS)} at {on} of {n} points "
                   f"(no cheaper point above DPN's ci95 upper bound); by point estimate at {strict} of {n}")
    return out


# ----- command line and work dir -------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage too)
        raise BadInput(message)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", required=True, help="a finished `dpn pipeline run` work dir")
    p.add_argument("--budgets", default=None,
                   help="comma-separated DPN budgets (fractions of the uncompressed prefill FLOPs); default: 25/50/75%% "
                        "of the checkpoint's reachable range")
    p.add_argument("--n-eval", type=int, default=1200, help="questions (generated, or the first of --data-root)")
    p.add_argument("--dpn-model", default=None, help="a calibrated dpn checkpoint instead of W's route_calibrate step")
    p.add_argument("--none-model", default=None, help="an uncompressed checkpoint instead of W's stage2_none step")
    p.add_argument("--data-root", default=None, help="an existing eval root holding synthetic/ (default: generate)")
    p.add_argument("--out-dir", default=None, help="eval-set cache, pareto.json, pareto.png (default W/bench/pareto)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on this shared 2-core machine 2 threads ran 8x slower, see above)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=4, help="the synthetic benchmark's answers are one word")
    p.add_argument("--fastv-layer", type=int, default=None,
                   help="FastV's K for the fastv points (default: the uncompressed checkpoint's fastv_layer)")
    p.add_argument("--flops-tol", type=float, default=0.01,
                   help="relative TFLOPs slack within which a competitor counts as no more expensive than DPN")
    p.add_argument("--seed", type=int, default=0, help="bootstrap and random_paths draws")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the run to the work dir's MLflow store")
    args = p.parse_args(argv)
    if args.n_eval < 15:
        raise BadInput(f"--n-eval must be >= 15 (one question per category x difficulty cell), got {args.n_eval}")
    if args.fastv_layer is not None and args.fastv_layer < 1:
        raise BadInput(f"--fastv-layer must be >= 1 (layers 0..K-1 see every visual token), got {args.fastv_layer}")
    if args.threads < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise BadInput(f"--threads, --batch-size and --max-new-tokens must be >= 1, got {args.threads}, "
                       f"{args.batch_size}, {args.max_new_tokens}")
    if not (math.isfinite(args.flops_tol) and 0 <= args.flops_tol < 1):
        raise BadInput(f"--flops-tol must be in [0, 1), got {args.flops_tol}")
    if args.budgets is not None:
        try:
            args.budgets = [float(b) for b in args.budgets.split(",")]
        except ValueError:
            raise BadInput(f"--budgets must be comma-separated numbers like 0.5,0.6,0.7, got {args.budgets!r}") from None
        if not args.budgets or not all(math.isfinite(b) for b in args.budgets):
            raise BadInput(f"--budgets must be finite numbers, got {args.budgets}")
    return args


def newest_step(work_dir: Path, step: str) -> tuple[Path, dict[str, Any]]:
    """(folder, outputs) of the most recently finished run of pipeline step `step` in `work_dir`."""
    from pipelines.dag import SUCCESS_FILE

    root = work_dir / "pipeline" / "steps" / step
    done = [d for d in root.glob("*") if d.is_dir() and not d.name.startswith(".") and (d / SUCCESS_FILE).is_file()]
    if not done:
        raise BadInput(f"{work_dir}: no finished {step!r} step under {root} (is the pipeline run complete?)")
    folder = max(done, key=lambda d: (d / SUCCESS_FILE).stat().st_mtime)
    return folder, json.loads((folder / SUCCESS_FILE).read_text())["outputs"]


@dataclass(kw_only=True)
class WorkDir:
    root: Path
    dpn_dir: Path  # calibrated dpn checkpoint (tokenizer files inside)
    none_dir: Path  # uncompressed variant
    corpus_dir: Path
    dpn_config: dict[str, Any]  # its config.json
    none_config: dict[str, Any]

    @property
    def budget_range(self) -> tuple[float, float]:
        frac = self.dpn_config["budget_curve"]["flops_fraction"]
        return min(frac), max(frac)


def _step_model(root: Path, step: str, override: str | None, flag: str) -> Path:
    if override is not None:
        if not Path(override).is_dir():
            raise BadInput(f"{flag} {override!r} is not a directory")
        return Path(override)
    folder, outputs = newest_step(root, step)
    return folder / outputs["model_dir"]


def resolve_work_dir(path: str, dpn_model: str | None = None, none_model: str | None = None) -> WorkDir:
    """The checkpoints and corpus of a finished work dir; `dpn_model` / `none_model` replace its route_calibrate /
    stage2_none checkpoints (e.g. a dpn variant calibrated outside the pipeline)."""
    from pipelines.evaluate import check_checkpoint

    root = Path(path)
    if not root.is_dir():
        raise BadInput(f"--work-dir {path!r} is not a directory")
    dpn_dir = _step_model(root, "route_calibrate", dpn_model, "--dpn-model")
    none_dir = _step_model(root, "stage2_none", none_model, "--none-model")
    synth_step, synth_out = newest_step(root, "synth")
    wd = WorkDir(root=root, dpn_dir=dpn_dir, none_dir=none_dir, corpus_dir=synth_step / synth_out["corpus"],
                 dpn_config={}, none_config={})
    try:
        wd.dpn_config = check_checkpoint(wd.dpn_dir, "dpn")
        wd.none_config = check_checkpoint(wd.none_dir, "none")
    except (FileNotFoundError, ValueError) as e:
        raise BadInput(str(e)) from None
    if not wd.dpn_config.get("budget_curve"):
        raise BadInput(f"{wd.dpn_dir} has no budget_curve: the route_calibrate step did not calibrate it")
    if not (wd.corpus_dir / "manifest.json").is_file():
        raise BadInput(f"{wd.corpus_dir}: no manifest.json (the synth step's corpus)")
    return wd


def resolve_budgets(wd: WorkDir, budgets: Sequence[float] | None) -> list[float]:
    """The budgets to run: the given ones (each checked against the reachable range), else 3 spread inside it."""
    from pipelines.evaluate import check_checkpoint

    lo, hi = wd.budget_range
    if budgets is None:
        budgets = [lo + q * (hi - lo) for q in DEFAULT_QUANTILES]
    for b in budgets:
        try:
            check_checkpoint(wd.dpn_dir, "dpn", b)
        except ValueError as e:
            raise BadInput(f"--budgets: {e}") from None
    return [float(b) for b in budgets]


def eval_root(wd: WorkDir, args: argparse.Namespace, out_dir: Path) -> Path:
    """The eval root to use: --data-root, else a benchmark of --n-eval questions generated with the work dir's
    corpus generator config (cached in out_dir/eval-N)."""
    if args.data_root is not None:
        root = Path(args.data_root)
        if not (root / "synthetic").is_dir():
            raise BadInput(f"--data-root {args.data_root!r} holds no synthetic/ benchmark folder")
        return root
    from pipelines.synth import SynthConfig, write_corpus

    manifest = json.loads((wd.corpus_dir / "manifest.json").read_text())
    config = dict(manifest["config"])
    # Only the eval stream matters; pre-training / instruct records are the minimum the generator accepts.
    config.update(n_eval=args.n_eval, n_pretrain=1, n_instruct=1, n_calibration=0)
    target = out_dir / f"eval-{args.n_eval}"
    summary = write_corpus(target, SynthConfig(**config))
    how = "reused" if summary.get("reused") else f"generated in {summary.get('seconds', 0):.1f}s"
    _log(f"eval set: {args.n_eval} questions, generator seed {config['seed']}, {target} ({how})")
    return target / "eval"


# ----- running points ----------------------------------------------------------------------------------
def _log(msg: str) -> None:
    print(f"[pareto] {msg}", file=sys.stderr, flush=True)


@dataclass(kw_only=True)
class Point:
    method: str
    label: str
    records: list[dict[str, Any]]
    hits: list[float]  # per question, in benchmark order
    metrics: dict[str, Any]
    num_image_tokens: int
    budget: float | None = None
    path: str | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.method}/{self.label}"

    @property
    def tflops(self) -> float:
        return sum(r["metadata"]["prefill_tflops"] for r in self.records) / len(self.records)

    def to_json(self, seed: int) -> dict[str, Any]:
        meta = [r["metadata"] for r in self.records]
        return {
            "method": self.method, "label": self.label, "budget": self.budget, "path": self.path,
            "tflops": self.tflops,
            "tflops_exact": sum(m["prefill_tflops_exact"] for m in meta) / len(meta),
            "accuracy": self.metrics["accuracy"], "ci95": list(bootstrap_ci(self.hits, seed=seed)),
            "equiv_visual_tokens_576": equiv_visual_tokens_576([m["visual_tokens_per_layer"] for m in meta],
                                                               self.num_image_tokens),
            "accuracy_by_difficulty": self.metrics.get("per_difficulty", {}),
            "n": len(self.records),
            "path_shares": _path_shares(self.records) if self.method in ("dpn", "random", "random_paths") else None,
            "seconds": round(self.seconds, 2),
            **self.extra,
        }


def _path_shares(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    counts = Counter(r["metadata"]["routing_path"] for r in records)
    return {k: counts[k] / len(records) for k in sorted(counts)}


def _factor_label(label: str) -> str:
    """A measured routing path ("4-4-n": DPE 3 saw too few tokens to pool) as factors only: "n" -> 1 (keep),
    which is what any expert does there."""
    from dpn.compressors import NOT_POOLED

    return "-".join("1" if part == NOT_POOLED else part for part in label.split("-"))


def effective_path(config, path: Sequence[int]) -> str:
    """The path label a forced `path` shows in the model's output: "n" at a DPE whose grid has fewer than
    `min_tokens_to_pool` tokens (nothing is pooled or scaled there, whatever the factor), e.g. 4-4-1, 4-4-2 and
    4-4-4 are all "4-4-n" on the tiny preset's 12 x 12 grid (the third DPE sees 3 x 3)."""
    from dpn.compressors import format_path
    from dpn.geometry import pooled_grid

    h, w = config.vision_grid
    out: list[int | None] = []
    for f in path:
        if h * w < config.min_tokens_to_pool:
            out.append(None)
        else:
            h, w = pooled_grid(h, w, config.experts[config.expert_index(int(f))])
            out.append(int(f))
    return format_path(out)


class Runner:
    """Loads checkpoints, answers the benchmark, scores; one process, `torch.set_num_threads(threads)`."""

    def __init__(self, wd: WorkDir, bench, args: argparse.Namespace):
        import torch

        from dpn.image_processing import build_image_processor
        from dpn.tokenizer import load_tokenizer

        torch.set_num_threads(args.threads)
        self.wd, self.bench, self.args = wd, bench, args
        self.tokenizer = load_tokenizer(wd.dpn_dir)
        self.none_tokenizer = load_tokenizer(wd.none_dir) if _has_tokenizer(wd.none_dir) else self.tokenizer
        self.processor = build_image_processor(wd.dpn_config["vision_config"]["image_size"])
        self.truth = {g["question_id"]: g for g in bench.ground_truth}
        self.order = [it.question_id for it in bench.items]
        self.done, self.total = 0, 0  # forward points answered / planned, for the progress lines

    def load(self, which: str, compressor: str, **kw):
        from pipelines.evaluate import load_model

        return load_model(self.wd.dpn_dir if which == "dpn" else self.wd.none_dir, compressor, **kw)

    def answer(self, model, *, prompt_compressor: str, tokenizer=None, path: Sequence[int] | None = None):
        from pipelines.evaluate import predict

        return predict(model, tokenizer or self.tokenizer, self.processor, self.bench.items,
                       compressor=prompt_compressor, benchmark="synthetic", model_id="pareto", path=path,
                       batch_size=self.args.batch_size, max_new_tokens=self.args.max_new_tokens)

    def point(self, method: str, label: str, records: list[dict[str, Any]], num_image_tokens: int,
              seconds: float, forward: bool = True, **kw) -> Point:
        from dpn.eval.scoring import join_predictions, score, score_synthetic

        metrics = score("synthetic", records, self.bench.ground_truth)
        # Per-question scores for the bootstrap, from the same scorer, one question at a time.
        by_id = {g["question_id"]: score_synthetic([(g, text)])["accuracy"] / 100.0
                 for g, text in join_predictions(records, self.bench.ground_truth)}
        hits = [by_id[q] for q in self.order]
        if abs(100.0 * sum(hits) / len(hits) - metrics["accuracy"]) > 1e-9:
            raise RuntimeError(f"{method}/{label}: per-question scores disagree with the scorer's accuracy")
        p = Point(method=method, label=label, records=records, hits=hits, metrics=metrics,
                  num_image_tokens=num_image_tokens, seconds=seconds, **kw)
        if forward:
            self.done += 1
        step = f"[{self.done}/{self.total}]" if forward else "[derived]"
        _log(f"{step:<8} {p.key:<22} {len(records)} q in {seconds:6.1f}s  acc {metrics['accuracy']:5.1f}  "
             f"{p.tflops:.4g} TFLOPs")
        return p


def _has_tokenizer(d: Path) -> bool:
    return (d / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file()


def run_points(wd: WorkDir, bench, budgets: list[float], args: argparse.Namespace) -> list[Point]:
    from dpn.compressors import format_path
    from dpn.configuration_dpn import DPNConfig
    from dpn.routing import all_paths

    run = Runner(wd, bench, args)
    dpn_cfg = DPNConfig.from_pretrained(str(wd.dpn_dir))
    n_static = len({effective_path(dpn_cfg, [dpn_cfg.expert_factors[j] for j in e]) for e in all_paths(dpn_cfg)})
    n_dpn = 1 + len(budgets)
    run.total = 1 + n_dpn + n_static + 3 * n_dpn  # none, dpn, static, then random / fastv / pdrop per dpn point
    points: list[Point] = []

    def timed(model, **kw):
        t0 = time.perf_counter()
        out = run.answer(model, **kw)
        return out, time.perf_counter() - t0

    # none: the reference point, and the text lengths the peers' ratios are solved for.
    model = run.load("none", "none")
    n_img = model.config.num_image_tokens
    recs, s = timed(model, prompt_compressor="none", tokenizer=run.none_tokenizer)
    points.append(run.point("none", "none", recs, n_img, s))
    text_lengths = [r["metadata"]["text_tokens_per_layer"][0] for r in recs]
    peer_overrides = {} if args.fastv_layer is None else {"fastv_layer": args.fastv_layer}
    peer_config = copy.deepcopy(model.config)
    for name, value in peer_overrides.items():
        setattr(peer_config, name, value)

    # dpn: saved point, then each budget.
    dpn_points: list[Point] = []
    saved = wd.dpn_config.get("budget")
    model = run.load("dpn", "dpn")
    recs, s = timed(model, prompt_compressor="dpn")
    dpn_points.append(run.point("dpn", "saved", recs, n_img, s, budget=saved,
                                extra={"route_bias": model.config.effective_route_bias()}))
    for b in budgets:
        model = run.load("dpn", "dpn", budget=b)
        recs, s = timed(model, prompt_compressor="dpn")
        dpn_points.append(run.point("dpn", f"b{b:.3f}", recs, n_img, s, budget=b,
                                    extra={"route_bias": model.config.effective_route_bias()}))
    points += dpn_points

    # static: every fixed path of the same weights and prompts. Paths that differ only at a DPE with too few
    # tokens to pool run the same computation: answered once, the others share its answers ("same_as").
    model = run.load("dpn", "dpn")
    factors = model.config.expert_factors
    static: dict[str, Point] = {}
    ran: dict[str, str] = {}  # effective path -> the static label answered for it
    for experts in all_paths(model.config):
        path = [factors[j] for j in experts]
        label, eff = format_path(path), effective_path(model.config, path)
        if eff in ran:
            first = static[ran[eff]]
            static[label] = run.point("static", label, first.records, n_img, 0.0, forward=False, path=label,
                                      extra={"same_as": first.label, "effective_path": eff})
            continue
        recs, s = timed(model, prompt_compressor="dpn", path=path)
        shown = {r["metadata"]["routing_path"] for r in recs}
        if shown != {eff}:
            raise RuntimeError(f"static {label}: the model routed {sorted(shown)}, effective_path says {eff}")
        ran[eff] = label
        static[label] = run.point("static", label, recs, n_img, s, path=label, extra={"effective_path": eff})
    points += static.values()

    # A dpn answer must equal the static answer on the same path (the routers only choose the path).
    for d in dpn_points:
        same = sum(r["text"] == static[_factor_label(r["metadata"]["routing_path"])].records[i]["text"]
                   for i, r in enumerate(d.records))
        d.extra["same_answer_as_static_on_its_path_pct"] = 100.0 * same / len(d.records)

    for d in dpn_points:
        shares = {}
        for label, share in _path_shares(d.records).items():
            key = _factor_label(label)
            shares[key] = shares.get(key, 0.0) + share
        tag = {"budget": d.budget, "matched_to": d.key, "random_path_shares": shares}
        # random: the random compressor on the dpn weights (prompts without <ROUTER>, see the docstring).
        model = run.load("dpn", "random", random_path_shares=shares)
        recs, s = timed(model, prompt_compressor="random")
        points.append(run.point("random", d.label, recs, n_img, s, budget=d.budget, extra=dict(tag)))
        # random_paths: a path drawn per question from the same shares, answered as static did on it.
        t0 = time.perf_counter()
        rng = random.Random(f"pareto:{args.seed}:{d.label}")
        labels = list(shares)
        drawn = rng.choices(labels, weights=[shares[k] for k in labels], k=len(run.order))
        recs = [static[lab].records[i] for i, lab in enumerate(drawn)]
        points.append(run.point("random_paths", d.label, recs, n_img, time.perf_counter() - t0, forward=False,
                                budget=d.budget, extra=dict(tag)))

    # fastv / pdrop on the uncompressed variant, at the ratio matching each dpn point's measured TFLOPs.
    for method in ("fastv", "pdrop"):
        for d in dpn_points:
            m = solve_ratio(peer_config, method, d.tflops, text_lengths, tol=args.flops_tol)
            model = run.load("none", method, **{RATIO_FIELD[method]: m.ratio}, **peer_overrides)
            recs, s = timed(model, prompt_compressor=method, tokenizer=run.none_tokenizer)
            extra = {"matched_to": d.key, RATIO_FIELD[method]: m.ratio, "target_tflops": m.target_tflops,
                     "predicted_tflops": m.predicted_tflops, "reachable_tflops": list(m.reachable_tflops),
                     "matched": m.matched}
            if method == "fastv":
                extra["fastv_layer"] = peer_config.fastv_layer
            else:
                extra["pdrop_layers"] = list(peer_config.pdrop_layers)
            points.append(run.point(method, d.label, recs, n_img, s, budget=d.budget, extra=extra))
    return points


# ----- reporting -----------------------------------------------------------------------------------------
def format_table(points: Sequence[Mapping[str, Any]], none_tflops: float | None) -> str:
    diffs = sorted({k for p in points for k in p["accuracy_by_difficulty"]},
                   key=lambda k: (("easy", "medium", "hard") + (k,)).index(k))
    head = ["method", "label", "budget", "ratio", "TFLOPs", "vs none", "tok/576", "acc", "ci95", *diffs]
    rows = [head]
    for p in sorted(points, key=lambda p: (METHODS.index(p["method"]), p["tflops"])):
        ratio = (f"drop {p['fastv_ratio']:.3f}" if "fastv_ratio" in p
                 else f"keep {p['pdrop_ratio']:.3f}" if "pdrop_ratio" in p else None)
        rows.append([
            p["method"], p["label"], "-" if p["budget"] is None else f"{p['budget']:.3f}",
            "-" if ratio is None else ratio + ("" if p.get("matched", True) else " (unmatched)"),
            f"{p['tflops']:.4g}", "-" if not none_tflops else f"{100 * p['tflops'] / none_tflops:.1f}%",
            f"{p['equiv_visual_tokens_576']:.0f}", f"{p['accuracy']:.1f}",
            f"[{p['ci95'][0]:.1f}, {p['ci95'][1]:.1f}]",
            *[f"{p['accuracy_by_difficulty'].get(k, float('nan')):.1f}" for k in diffs],
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def plot(points: Sequence[Mapping[str, Any]], front: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Accuracy vs prefill TFLOPs, one marker per method, ci95 error bars, static paths labelled, the
    competitors' frontier dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    style = {"dpn": ("*", "tab:red", 14), "static": ("o", "tab:gray", 6), "random": ("v", "tab:purple", 7),
             "random_paths": ("^", "tab:pink", 7), "fastv": ("s", "tab:blue", 7), "pdrop": ("D", "tab:green", 6),
             "none": ("X", "black", 9)}
    fig = Figure(figsize=(10, 6.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for method in METHODS:
        pts = [p for p in points if p["method"] == method]
        if not pts:
            continue
        marker, color, size = style[method]
        xs, ys = [p["tflops"] for p in pts], [p["accuracy"] for p in pts]
        err = [[p["accuracy"] - p["ci95"][0] for p in pts], [p["ci95"][1] - p["accuracy"] for p in pts]]
        ax.errorbar(xs, ys, yerr=err, fmt=marker, color=color, markersize=size, capsize=2, elinewidth=0.8,
                    alpha=0.5 if method == "static" else 0.85, label=method, zorder=3 if method == "dpn" else 2)
        if method in ("static", "dpn"):
            for p in pts:
                ax.annotate(p["label"], (p["tflops"], p["accuracy"]), textcoords="offset points", xytext=(3, 3),
                            fontsize=6 if method == "static" else 8, color=color)
    if front:
        # A step line: the best competitor accuracy reachable at each FLOPs, held to the right edge.
        xs = [f["tflops"] for f in front] + [max(p["tflops"] for p in points)]
        ys = [f["accuracy"] for f in front] + [front[-1]["accuracy"]]
        ax.plot(xs, ys, "--", color="gray", linewidth=1, drawstyle="steps-post", label="frontier (competitors)")
    ax.set_xlabel("LLM prefill TFLOPs / sample (FastV convention)")
    ax.set_ylabel("accuracy (%), 95% bootstrap interval")
    ax.set_title("Equal-FLOPs comparison on the synthetic benchmark")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def log_mlflow(wd: WorkDir, result: Mapping[str, Any], json_path: Path, png_path: Path,
               params: Mapping[str, Any]) -> str:
    from pipelines import tracking

    run = tracking.RunTracker.open(tracking_uri=tracking.resolve_tracking_uri(None, wd.root), work_dir=wd.root,
                                   experiment="dpn", run_name="pareto")
    try:
        run.log_params(params)
        metrics = {}
        for p in result["points"]:
            base = f"pareto/{p['method']}/{p['label']}"
            metrics[f"{base}/accuracy_pct"] = p["accuracy"]
            metrics[f"{base}/prefill_tflops"] = p["tflops"]
            metrics[f"{base}/ci95_low_pct"] = p["ci95"][0]
            metrics[f"{base}/ci95_high_pct"] = p["ci95"][1]
            metrics[f"{base}/equiv_visual_tokens_576"] = p["equiv_visual_tokens_576"]
        for label, e in result["verdict"]["points"].items():
            metrics[f"pareto/verdict/{label}/on_or_above_frontier"] = float(e["on_or_above_frontier"])
        run.log_metrics(metrics, step=0)
        run.log_dict(dict(result), "pareto/pareto.json")
        run.log_artifact(png_path, "pareto")
    except BaseException:
        run.finish("FAILED")
        raise
    run.finish()
    return run.run_id


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    # One "Loading weights" bar and load report per point would bury the progress lines; `load_model` itself
    # refuses a checkpoint that leaves weights uninitialised (the routers a "random" load skips are expected).
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    try:
        args = parse_args(argv)
        wd = resolve_work_dir(args.work_dir, args.dpn_model, args.none_model)
        budgets = resolve_budgets(wd, args.budgets)
        n_layers = wd.none_config.get("text_config", {}).get("num_hidden_layers")
        if args.fastv_layer is not None and n_layers and args.fastv_layer >= n_layers:
            raise BadInput(f"--fastv-layer must be < the LLM's {n_layers} layers, got {args.fastv_layer}")
        out_dir = Path(args.out_dir) if args.out_dir else wd.root / "bench" / "pareto"
        root = eval_root(wd, args, out_dir)
        from pipelines.evaluate import load_benchmark

        try:
            bench = load_benchmark("synthetic", root, limit=args.n_eval)
        except (FileNotFoundError, ValueError) as e:
            raise BadInput(f"eval root {root}: {e}") from None
    except BadInput as e:
        print(f"pareto: error: {e}", file=sys.stderr)
        return 2
    lo, hi = wd.budget_range
    _log(f"work dir {wd.root}: dpn {wd.dpn_dir}, none {wd.none_dir}; reachable budget [{lo:.3f}, {hi:.3f}], "
         f"budgets {', '.join(f'{b:.3f}' for b in budgets)}; {len(bench.items)} questions; {args.threads} thread(s)")

    points = run_points(wd, bench, budgets, args)
    out_points = [p.to_json(args.seed) for p in points]
    hits = {p.key: p.hits for p in points}
    front = frontier(out_points)
    result: dict[str, Any] = {
        "points": out_points,
        "frontier": {"methods": list(COMPETITORS), "points": front},
        "verdict": verdict(out_points, args.flops_tol, hits=hits, seed=args.seed),
        "setup": {
            "work_dir": str(wd.root), "dpn_model": str(wd.dpn_dir), "none_model": str(wd.none_dir),
            "eval_root": str(root), "n": len(bench.items), "budgets": budgets, "reachable_budget": [lo, hi],
            "ci": f"95% percentile bootstrap over questions, {BOOTSTRAP_RESAMPLES} resamples, seed {args.seed}",
            "flops": "LLM prefill TFLOPs per sample, FastV convention (dpn.flops), measured from each sample's counts",
            "threads": args.threads, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        },
    }
    none_tflops = next(p["tflops"] for p in out_points if p["method"] == "none")
    print(format_table(out_points, none_tflops), file=sys.stderr)
    for label, e in result["verdict"]["points"].items():
        best = e.get("best_competitor", {})
        paired = best.get("dpn_minus_best_ci95_paired")
        _log(f"verdict dpn/{label}: {'on/above' if e['on_or_above_frontier'] else 'BELOW'} frontier (ci), "
             f"{'on/above' if e['strict_on_or_above'] else 'below'} by point estimate; best cheaper competitor "
             f"{best.get('point', '-')} {best.get('accuracy', float('nan')):.1f}, dpn - best "
             f"{best.get('dpn_minus_best', float('nan')):+.1f}"
             + ("" if paired is None else f" (paired ci95 [{paired[0]:+.1f}, {paired[1]:+.1f}])"))
    _log(result["verdict"]["text"])
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(out_points, front, out_dir / "pareto.png")
    result["plot"] = str(png)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    json_path = out_dir / "pareto.json"
    json_path.write_text(json.dumps(result, indent=2))
    if not args.no_mlflow:
        params = {"n_eval": len(bench.items), "budgets": ",".join(f"{b:.4f}" for b in budgets),
                  "dpn_model": str(wd.dpn_dir), "none_model": str(wd.none_dir),
                  "eval_root": str(root), "flops_tol": args.flops_tol, "seed": args.seed, "threads": args.threads}
        result["mlflow_run_id"] = log_mlflow(wd, result, json_path, png, params)
        json_path.write_text(json.dumps(result, indent=2))
    _log(f"wrote {json_path} and {png}; {result['seconds']:.0f}s in all")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
