"""What an evaluation reports: per benchmark, FLOPs means and routing-path shares (`aggregate`); per
(model, compressor), the summary row; the tables the demo prints (results, per question type, routing by
difficulty); the figures; and the MLflow metric keys of a row (`child_metrics`). Plain data in, plain
data (or a PNG) out: nothing here talks to Ray or MLflow.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dpn.compressors import NOT_POOLED
from dpn.eval.scoring import load_jsonl
from pipelines.data.synth.questions import DIFFICULTIES
from pipelines.evaluation.benchmarks import qid_key

_DIFFICULTY_ORDER = DIFFICULTIES  # the synthetic benchmark's levels, easiest first; others sort after, by name
_METRIC_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")


# ----- aggregation -------------------------------------------------------------------------------------
def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _difficulty_key(name: str) -> tuple[int, str]:
    return (_DIFFICULTY_ORDER.index(name), "") if name in _DIFFICULTY_ORDER else (len(_DIFFICULTY_ORDER), name)


def _shares(labels: Sequence[str]) -> dict[str, float]:
    counts = Counter(labels)
    return {k: 100.0 * n / len(labels) for k, n in sorted(counts.items())}


def aggregate(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """FLOPs means and routing-path shares (percent) of one benchmark's answer records."""
    meta = [r["metadata"] for r in records]
    by_difficulty: dict[str, list[str]] = defaultdict(list)
    tflops_by_difficulty: dict[str, list[float]] = defaultdict(list)
    for m in meta:
        if m.get("difficulty") is not None:
            by_difficulty[m["difficulty"]].append(m["routing_path"])
            tflops_by_difficulty[m["difficulty"]].append(m["prefill_tflops"])
    return {
        "num_samples": len(meta),
        "prefill_tflops_per_sample": _mean([m["prefill_tflops"] for m in meta]),
        "prefill_tflops_exact_per_sample": _mean([m["prefill_tflops_exact"] for m in meta]),
        "baseline_prefill_tflops_per_sample": _mean([m["baseline_prefill_tflops"] for m in meta]),
        "vision_tflops_per_sample": _mean([m["vision_tflops"] for m in meta]),
        "path_shares": _shares([m["routing_path"] for m in meta]),
        "path_shares_by_difficulty": {
            d: _shares(by_difficulty[d]) for d in sorted(by_difficulty, key=_difficulty_key)
        },
        "prefill_tflops_by_difficulty": {
            d: _mean(tflops_by_difficulty[d]) for d in sorted(tflops_by_difficulty, key=_difficulty_key)
        },
    }


def _saving_pct(ours: float | None, base: float | None) -> float | None:
    if ours is None or not base:
        return None
    return 100.0 * (1.0 - ours / base)


def summary_row(target: str, compressor: str, per_bench: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The summary row of one (model, compressor): per-benchmark results plus sample-weighted means."""
    n = sum(b["num_samples"] for b in per_bench.values())

    def weighted(key: str) -> float | None:
        if not n or any(b[key] is None for b in per_bench.values()):
            return None
        return sum(b[key] * b["num_samples"] for b in per_bench.values()) / n

    tflops = weighted("prefill_tflops_per_sample")
    base = weighted("baseline_prefill_tflops_per_sample")
    return {
        "model": target,
        "compressor": compressor,
        "num_samples": n,
        "accuracy": {k: b["primary"] for k, b in per_bench.items()},
        "accuracy_by_difficulty": {
            k: b["metrics"]["per_difficulty"] for k, b in per_bench.items() if "per_difficulty" in b["metrics"]
        },
        "metrics": {k: b["metrics"] for k, b in per_bench.items()},
        "prefill_tflops_per_sample": tflops,
        "prefill_tflops_exact_per_sample": weighted("prefill_tflops_exact_per_sample"),
        "baseline_prefill_tflops_per_sample": base,
        "vision_tflops_per_sample": weighted("vision_tflops_per_sample"),
        "prefill_tflops_by_benchmark": {k: b["prefill_tflops_per_sample"] for k, b in per_bench.items()},
        "saving_vs_uncompressed_pct": _saving_pct(tflops, base),
        "saving_vs_none_pct": None,
        "path_shares": {k: b["path_shares"] for k, b in per_bench.items()},
        "path_shares_by_difficulty": {
            k: b["path_shares_by_difficulty"] for k, b in per_bench.items() if b["path_shares_by_difficulty"]
        },
        "prefill_tflops_by_difficulty": {
            k: b["prefill_tflops_by_difficulty"] for k, b in per_bench.items() if b.get("prefill_tflops_by_difficulty")
        },
        "predictions": {k: b["predictions"] for k, b in per_bench.items()},
        "mlflow_run_id": None,
    }


def fill_saving_vs_none(rows: list[dict[str, Any]]) -> None:
    # Baseline: the same model run with compressor "none", else the first "none" row (in the pipeline each
    # variant is its own model; the none-trained one is the LLaVA-1.5 baseline). Same questions either way.
    nones = [r for r in rows if r["compressor"] == "none"]
    for row in rows:
        same = [r for r in nones if r["model"] == row["model"]]
        base = (same or nones or [None])[0]
        if base is not None:
            row["saving_vs_none_pct"] = _saving_pct(row["prefill_tflops_per_sample"], base["prefill_tflops_per_sample"])


def format_table(summary: Mapping[str, Any]) -> str:
    """The results table the demo prints: one line per (model, compressor)."""
    benches = list(summary["benchmarks"])
    difficulties = sorted(
        {d for r in summary["rows"] for acc in r["accuracy_by_difficulty"].values() for d in acc}, key=_difficulty_key
    )
    head = ["model", "compressor", *benches, *[f"acc/{d}" for d in difficulties], "TFLOPs/sample",
            "saving vs none", "top path"]
    lines = [head]
    for r in summary["rows"]:
        by_diff: dict[str, float] = {}
        for acc in r["accuracy_by_difficulty"].values():  # the synthetic benchmark's
            by_diff.update(acc)
        shares = Counter()
        for s in r["path_shares"].values():
            shares.update(s)
        top = max(shares.items(), key=lambda kv: kv[1])[0] if shares else "-"
        lines.append([
            r["model"], r["compressor"],
            *[_fmt(r["accuracy"].get(b)) for b in benches],
            *[_fmt(by_diff.get(d)) for d in difficulties],
            "-" if r["prefill_tflops_per_sample"] is None else f"{r['prefill_tflops_per_sample']:.4g}",
            "-" if r["saving_vs_none_pct"] is None else f"{r['saving_vs_none_pct']:.1f}%",
            top,
        ])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines)


def format_category_table(summary: Mapping[str, Any], chance_pct: Mapping[str, float], benchmark: str = "synthetic",
                          difficulties: Sequence[str] = ()) -> str:
    """Accuracy per question type of `benchmark` (its scorer's `per_category`), one line per model, under a
    line of each type's chance level: which skills a model has learned, which it only guesses. With
    `difficulties`, each model's line is followed by one line per difficulty (the scorer's
    `per_category_difficulty`): whether a skill holds beyond the easy, one-object scenes."""
    categories = list(chance_pct)
    lines = [["per question type", *categories], ["chance", *[_fmt(chance_pct[c]) for c in categories]]]
    for r in summary["rows"]:
        metrics = r.get("metrics", {}).get(benchmark, {})
        per = metrics.get("per_category")
        if per is not None:
            lines.append([f"{r['model']}/{r['compressor']}", *[_fmt(per.get(c)) for c in categories]])
            cells = metrics.get("per_category_difficulty", {})
            for d in difficulties:
                lines.append([f"  {d}", *[_fmt(cells.get(f"{c}/{d}")) for c in categories]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


# ----- figures -----------------------------------------------------------------------------------------
def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both axes (fewer FLOPs and higher accuracy), by FLOPs."""
    front = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def plot_accuracy_vs_flops(summary: Mapping[str, Any], path: Path) -> Path:
    """One panel per benchmark: primary metric vs prefill TFLOPs/sample, one point per (model, compressor),
    the Pareto front drawn through the non-dominated points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    benches = list(summary["benchmarks"])
    fig = Figure(figsize=(4.5 * len(benches), 3.8))
    FigureCanvasAgg(fig)
    for i, bench in enumerate(benches):
        ax = fig.add_subplot(1, len(benches), i + 1)
        points = []
        for r in summary["rows"]:
            x, y = r["prefill_tflops_by_benchmark"].get(bench), r["accuracy"].get(bench)
            if x is None or y is None:
                continue
            points.append((x, y))
            ax.scatter([x], [y], s=40)
            ax.annotate(f"{r['model']}/{r['compressor']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = _pareto_front(points)
        if len(front) > 1:
            ax.plot([p[0] for p in front], [p[1] for p in front], linestyle="--", color="gray", linewidth=1)
        ax.set_xlabel("LLM prefill TFLOPs / sample")
        ax.set_ylabel(f"{bench} (primary metric)")
        ax.set_title(bench)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _pools(row: Mapping[str, Any]) -> bool:
    """Whether any sample of the row was pooled at some DPE (not so for `none`, `fastv`, `pdrop`)."""
    return any(
        part != NOT_POOLED for shares in row["path_shares"].values() for label in shares for part in label.split("-")
    )


def plot_routing_by_difficulty(summary: Mapping[str, Any], path: Path) -> Path:
    """Stacked bars: share of samples per routing path, by difficulty (in the order of the synthetic
    benchmark's levels), one panel per (model, compressor) that pools at all; benchmarks without a
    difficulty field (all but the synthetic one) are pooled into one "all" bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in summary["rows"] if _pools(r)]
    fig = Figure(figsize=(4.0 * max(1, len(rows)), 3.8))
    FigureCanvasAgg(fig)
    if not rows:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no compressor pools visual tokens", ha="center", va="center")
        ax.set_axis_off()
    for i, r in enumerate(rows):
        ax = fig.add_subplot(1, len(rows), i + 1)
        groups: dict[str, dict[str, float]] = {}
        for by_diff in r["path_shares_by_difficulty"].values():
            groups.update(by_diff)
        groups = {d: groups[d] for d in sorted(groups, key=_difficulty_key)}
        if not groups:
            groups = {"all": Counter()}
            for s in r["path_shares"].values():
                groups["all"].update({k: v / len(r["path_shares"]) for k, v in s.items()})
        names = list(groups)
        labels = sorted({p for g in groups.values() for p in g})
        bottom = [0.0] * len(names)
        for label in labels:
            heights = [groups[n].get(label, 0.0) for n in names]
            ax.bar(names, heights, bottom=bottom, label=label)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.set_ylim(0, 100)
        ax.set_ylabel("share of samples (%)")
        ax.set_title(f"{r['model']}/{r['compressor']}", fontsize=9)
        ax.legend(title="path (factor per DPE)", fontsize=7, title_fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# ----- MLflow metric keys, routing summaries ----------------------------------------------------------
def _metric_key(*parts: str) -> str:
    return "/".join(_METRIC_KEY_BAD.sub("_", str(p)) for p in parts)


def _flat_metrics(prefix: tuple[str, ...], value: Any) -> dict[str, float]:
    if isinstance(value, Mapping):
        out: dict[str, float] = {}
        for k, v in value.items():
            out.update(_flat_metrics((*prefix, str(k)), v))
        return out
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return {}
    return {_metric_key(*prefix): float(value)}


def child_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The MLflow metrics of one (model, compressor) child run: `eval/<benchmark>/<metric>` (percent,
    MME as scores), `flops/...` with units in the name, `routing/<benchmark>/[<difficulty>/]share_pct/<path>`."""
    m: dict[str, float] = {}
    for bench, metrics in row["metrics"].items():
        m.update(_flat_metrics(("eval", bench), metrics))
        if row["accuracy"][bench] is not None:
            m[_metric_key("eval", bench, "primary")] = float(row["accuracy"][bench])
    m["eval/num_samples"] = float(row["num_samples"])
    for key, name in (
        ("prefill_tflops_per_sample", "prefill_tflops_per_sample"),
        ("prefill_tflops_exact_per_sample", "prefill_tflops_exact_per_sample"),
        ("baseline_prefill_tflops_per_sample", "baseline_prefill_tflops_per_sample"),
        ("vision_tflops_per_sample", "vision_tflops_per_sample"),
        ("saving_vs_uncompressed_pct", "prefill_saving_vs_uncompressed_pct"),
        ("saving_vs_none_pct", "prefill_saving_vs_none_pct"),
    ):
        if row[key] is not None:
            m[_metric_key("flops", name)] = float(row[key])
    for bench, value in row["prefill_tflops_by_benchmark"].items():
        if value is not None:
            m[_metric_key("flops", bench, "prefill_tflops_per_sample")] = float(value)
    for bench, shares in row["path_shares"].items():
        m.update(_flat_metrics(("routing", bench, "share_pct"), shares))
    for bench, by_diff in row["path_shares_by_difficulty"].items():
        for difficulty, shares in by_diff.items():
            m.update(_flat_metrics(("routing", bench, difficulty, "share_pct"), shares))
    for bench, by_diff in row.get("prefill_tflops_by_difficulty", {}).items():
        for difficulty, value in by_diff.items():
            if value is not None:
                m[_metric_key("routing", bench, difficulty, "prefill_tflops_per_sample")] = float(value)
    return m


def routing_summary(row: Mapping[str, Any]) -> dict[str, Any]:
    """How one (model, compressor) row routed, as the pipeline summary reports it: `path_share` {path:
    share in [0, 1]} over all samples, `path_share_by_difficulty` {level: {path: share}} and
    `mean_tflops_by_difficulty` {level: prefill TFLOPs per sample} (levels easiest first: the synthetic
    benchmark's), `accuracy_by_difficulty` {level: primary metric}, and `path_share_by_benchmark`."""
    n = {b: m.get("num_samples") for b, m in row["metrics"].items()}
    weights = {b: (n[b] if isinstance(n[b], int) else 1) for b in row["path_shares"]}
    total = sum(weights.values()) or 1
    overall: dict[str, float] = defaultdict(float)
    for bench, shares in row["path_shares"].items():
        for path, pct in shares.items():
            overall[path] += pct / 100.0 * weights[bench] / total
    by_diff: dict[str, dict[str, float]] = {}
    for per_bench in row["path_shares_by_difficulty"].values():
        for level, shares in per_bench.items():
            by_diff[level] = {p: v / 100.0 for p, v in shares.items()}
    tflops: dict[str, float] = {}
    for per_bench in row.get("prefill_tflops_by_difficulty", {}).values():
        tflops.update({k: v for k, v in per_bench.items() if v is not None})
    acc: dict[str, float] = {}
    for per_bench in row["accuracy_by_difficulty"].values():
        acc.update(per_bench)
    order = sorted(set(by_diff) | set(tflops) | set(acc), key=_difficulty_key)
    return {
        "path_share": dict(sorted(overall.items())),
        "path_share_by_difficulty": {d: by_diff[d] for d in order if d in by_diff},
        "mean_tflops_by_difficulty": {d: tflops[d] for d in order if d in tflops},
        "accuracy_by_difficulty": {d: acc[d] for d in order if d in acc},
        "path_share_by_benchmark": {b: {p: v / 100.0 for p, v in s.items()} for b, s in row["path_shares"].items()},
    }


def format_routing_table(summary: Mapping[str, Any]) -> str:
    """Per (model, compressor) that pools, per difficulty level: share of samples on each path (%), mean
    prefill TFLOPs per sample and accuracy -- whether routers send harder samples down gentler paths."""
    lines: list[list[str]] = []
    for r in summary["rows"]:
        if not _pools(r):
            continue
        rs = routing_summary(r)
        paths = sorted(rs["path_share"], key=lambda p: -rs["path_share"][p])
        lines.append([f"{r['model']}/{r['compressor']}", *paths, "TFLOPs/sample", "accuracy"])
        levels = list(rs["path_share_by_difficulty"]) or ["all"]
        for level in levels:
            shares = rs["path_share_by_difficulty"].get(level, rs["path_share"])
            lines.append([f"  {level}", *[_fmt(100 * shares.get(p, 0.0), 1) for p in paths],
                          "-" if level not in rs["mean_tflops_by_difficulty"] else
                          f"{rs['mean_tflops_by_difficulty'][level]:.4g}", _fmt(rs["accuracy_by_difficulty"].get(level))])
        lines.append([""])
    if not lines:
        return "no compressor pools visual tokens"
    out = []
    for line in lines:
        out.append("  ".join(c.ljust(14 if i == 0 else 9) for i, c in enumerate(line)).rstrip())
    return "\n".join(out).rstrip()


def predictions_table(row: Mapping[str, Any], truth: Mapping[str, Mapping[tuple[str, Any], Mapping[str, Any]]]) -> dict:
    """All answers of a row as a table in the layout `mlflow.log_table` writes ({"columns", "data"})."""
    columns = ["benchmark", "question_id", "category", "difficulty", "prediction", "answer", "routing_path",
               "prefill_tflops"]
    data = []
    for bench, path in row["predictions"].items():
        for rec in load_jsonl(path):
            g = truth[bench].get(qid_key(rec["question_id"]), {})
            meta = rec["metadata"]
            answer = g.get("answer", g.get("answers"))
            data.append([bench, rec["question_id"], meta.get("category"), meta.get("difficulty"), rec["text"],
                         answer, meta["routing_path"], meta["prefill_tflops"]])
    return {"columns": columns, "data": data}
