"""bench/pareto.py: its pure parts (bootstrap intervals, FLOPs-matched ratios, equivalent visual tokens,
frontier and verdict) and its bad-input exits. The bench itself runs models and is never part of the suite."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from dpn.flops import analytic_token_counts
from dpn.presets import llava_1_5_7b, tiny

_PATH = Path(__file__).resolve().parents[1] / "bench" / "pareto.py"


@pytest.fixture(scope="module")
def pareto():
    # bench/ is not a package: load the file under its own module name (dataclasses look it up in sys.modules).
    spec = importlib.util.spec_from_file_location("bench_pareto", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


# ----- bootstrap -------------------------------------------------------------------------------------
def test_bootstrap_ci_matches_the_binomial_interval(pareto):
    hits = [1.0] * 600 + [0.0] * 600  # p = 0.5, n = 1200: normal approximation 50 +- 1.96 * sqrt(.25 / 1200)
    lo, hi = pareto.bootstrap_ci(hits, seed=0)
    half = 1.96 * (0.25 / 1200) ** 0.5 * 100  # 2.83 points
    assert lo == pytest.approx(50 - half, abs=0.4) and hi == pytest.approx(50 + half, abs=0.4)
    assert pareto.bootstrap_ci(hits, seed=0) == (lo, hi)  # fixed seed: reproducible
    assert pareto.bootstrap_ci([1.0] * 40) == (100.0, 100.0)  # degenerate: no spread
    with pytest.raises(ValueError, match="at least one"):
        pareto.bootstrap_ci([])


def test_paired_difference_interval(pareto):
    a = [1.0] * 300 + [0.0] * 300
    assert pareto.paired_diff_ci(a, a) == (0.0, 0.0)
    b = [1.0] * 240 + [0.0] * 360  # b right where a is, minus 60 questions: a - b = +10 points, never below 0
    lo, hi = pareto.paired_diff_ci(a, b, seed=1)
    assert 0.0 < lo < 10.0 < hi < 15.0
    with pytest.raises(ValueError, match="equally long"):
        pareto.paired_diff_ci(a, b[:-1])


# ----- equivalent visual tokens --------------------------------------------------------------------------
def test_equiv_visual_tokens_in_llava_units(pareto):
    cfg7 = llava_1_5_7b()
    none, _ = analytic_token_counts(cfg7, 64, compressor="none")
    assert pareto.equiv_visual_tokens_576([none], cfg7.num_image_tokens) == 576
    static, _ = analytic_token_counts(cfg7, 64, [4, 2, 1], "static")
    assert static == [576] * 8 + [144] * 8 + [72] * 16  # stages of 8 layers after 7 / 15 / 23
    assert pareto.equiv_visual_tokens_576([static], 576) == (576 + 144 + 72 + 72) / 4 == 216
    fastv, _ = analytic_token_counts(cfg7, 64, compressor="fastv")  # K = 2, R = 50%
    assert pareto.equiv_visual_tokens_576([fastv], 576) == (2 * 576 + 30 * 288) / 32
    # The tiny preset's 12 x 12 grid is rescaled: uncompressed is still 576, 4-2-1 its layer average x 4.
    cfg = tiny()
    none_t, _ = analytic_token_counts(cfg, 50, compressor="none")
    static_t, _ = analytic_token_counts(cfg, 50, [4, 2, 1], "static")
    assert pareto.equiv_visual_tokens_576([none_t], cfg.num_image_tokens) == 576
    assert pareto.equiv_visual_tokens_576([static_t], 144) == pytest.approx(4 * sum(static_t) / len(static_t))
    # Averaged over samples.
    assert pareto.equiv_visual_tokens_576([none, static], 576) == (576 + 216) / 2
    with pytest.raises(ValueError):
        pareto.equiv_visual_tokens_576([], 576)


def test_effective_path_names_dpes_that_cannot_pool(pareto):
    cfg = tiny()  # 12 x 12 grid; a DPE with fewer than 16 tokens does not pool
    assert [pareto.effective_path(cfg, p) for p in ([4, 4, 1], [4, 4, 2], [4, 4, 4])] == ["4-4-n"] * 3
    assert pareto.effective_path(cfg, [4, 2, 1]) == "4-2-1"  # 144 -> 36 -> 18: the third DPE still pools
    assert pareto.effective_path(cfg, [2, 2, 2]) == "2-2-2"
    assert pareto.effective_path(llava_1_5_7b(), [4, 4, 4]) == "4-4-4"  # 576 -> 144 -> 36 -> 9


# ----- FLOPs-matched ratios ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fastv", "pdrop"])
def test_solve_ratio_matches_a_dpn_path_at_7b(pareto, method):
    cfg = llava_1_5_7b()
    lengths = [58, 64, 64, 71, 90]
    target = pareto.analytic_mean_tflops(cfg, "static", lengths, path=[4, 2, 1])
    m = pareto.solve_ratio(cfg, method, target, lengths, tol=0.005)
    assert m.matched and m.predicted_tflops == pytest.approx(target, rel=0.005)
    # The ratio really gives those FLOPs, through the same arithmetic the model's counts follow.
    field = pareto.RATIO_FIELD[method]
    assert pareto.analytic_mean_tflops(cfg, method, lengths, **{field: m.ratio}) == pytest.approx(m.predicted_tflops)
    lo, hi = m.reachable_tflops
    assert lo < target < hi
    # FastV drops a share, PDrop keeps one; both strictly inside their domains here.
    assert 0.0 < m.ratio < 1.0
    # A gentler target needs a gentler ratio.
    gentle = pareto.solve_ratio(cfg, method, (target + hi) / 2, lengths)
    assert (gentle.ratio < m.ratio) if method == "fastv" else (gentle.ratio > m.ratio)


def test_solve_ratio_flags_an_unreachable_target(pareto):
    cfg = tiny()  # 4 layers, FastV K = 2: half the LLM always sees all 144 visual tokens
    lengths = [60]
    cheapest_dpn = pareto.analytic_mean_tflops(cfg, "static", lengths, path=[4, 4, 4])
    m = pareto.solve_ratio(cfg, "fastv", cheapest_dpn, lengths)
    assert not m.matched and m.predicted_tflops == m.reachable_tflops[0] > cheapest_dpn
    assert m.ratio > 0.999  # the aggressive end
    top = pareto.solve_ratio(cfg, "pdrop", 10 * cheapest_dpn, lengths)
    assert not top.matched and top.ratio == 1.0  # above the uncompressed FLOPs: keep everything
    with pytest.raises(ValueError, match="solve_ratio matches"):
        pareto.solve_ratio(cfg, "static", cheapest_dpn, lengths)


# ----- frontier and verdict --------------------------------------------------------------------------------
def _pt(method, label, tflops, acc, ci=None):
    return {"method": method, "label": label, "tflops": tflops, "accuracy": acc,
            "ci95": list(ci or (acc - 3, acc + 3)), "budget": None}


def test_verdict_dominated_and_within_ci(pareto):
    dpn_a = _pt("dpn", "b0.400", 1.0, 50.0, (47.0, 53.0))
    dpn_b = _pt("dpn", "b0.700", 2.0, 70.0, (67.0, 73.0))
    points = [
        dpn_a, dpn_b,
        _pt("static", "4-4-4", 0.9, 56.0),  # cheaper than dpn_a and above its ci95 upper bound: dominates it
        _pt("static", "2-2-2", 1.9, 71.0),  # cheaper than dpn_b, above its point estimate, inside its ci
        _pt("fastv", "b0.700", 2.01, 72.5),  # within 1% of dpn_b's TFLOPs: counts, still inside the ci
        _pt("pdrop", "b0.700", 2.5, 90.0),  # more expensive: never counts against either
        _pt("none", "none", 3.0, 95.0),  # the reference, not a competitor
    ]
    v = pareto.verdict(points, flops_tol=0.01)
    a, b = v["points"]["b0.400"], v["points"]["b0.700"]
    assert not a["on_or_above_frontier"] and a["beaten_beyond_ci_by"] == ["static/4-4-4"]
    assert not a["strict_on_or_above"]
    assert b["on_or_above_frontier"] and b["beaten_beyond_ci_by"] == []
    assert not b["strict_on_or_above"]
    assert sorted(b["beaten_by_point_estimate"]) == ["fastv/b0.700", "static/2-2-2"]
    assert b["best_competitor"]["point"] == "fastv/b0.700"
    assert b["best_competitor"]["dpn_minus_best"] == pytest.approx(-2.5)
    assert "1 of 2" in v["text"] and "0 of 2" in v["text"]
    # Without the tolerance the FastV point is the more expensive one and drops out.
    assert pareto.verdict(points, flops_tol=0.0)["points"]["b0.700"]["best_competitor"]["point"] == "static/2-2-2"
    # A dpn point above every cheaper competitor is on the frontier either way.
    ok = pareto.verdict([_pt("dpn", "x", 1.0, 60.0), _pt("random", "x", 1.0, 55.0)])["points"]["x"]
    assert ok["on_or_above_frontier"] and ok["strict_on_or_above"]


def test_verdict_adds_the_paired_interval(pareto):
    points = [_pt("dpn", "x", 1.0, 50.0), _pt("random_paths", "x", 1.0, 40.0)]
    hits = {"dpn/x": [1.0] * 50 + [0.0] * 50, "random_paths/x": [1.0] * 40 + [0.0] * 60}
    best = pareto.verdict(points, hits=hits)["points"]["x"]["best_competitor"]
    lo, hi = best["dpn_minus_best_ci95_paired"]
    assert 0.0 < lo <= 10.0 <= hi


def test_frontier_of_the_competitors(pareto):
    points = [
        _pt("static", "a", 1.0, 40.0), _pt("static", "b", 1.5, 38.0),  # b dominated by a
        _pt("fastv", "c", 2.0, 55.0), _pt("pdrop", "d", 0.5, 30.0),
        _pt("dpn", "e", 0.4, 99.0), _pt("none", "none", 3.0, 99.0),  # not competitors
    ]
    front = pareto.frontier(points)
    assert [f["label"] for f in front] == ["d", "a", "c"]
    assert [f["tflops"] for f in front] == sorted(f["tflops"] for f in front)


# ----- bad input --------------------------------------------------------------------------------------------
def _step(root: Path, step: str, outputs: dict) -> Path:
    d = root / "pipeline" / "steps" / step / "0123abcd"
    d.mkdir(parents=True)
    (d / "_SUCCESS.json").write_text(json.dumps({"name": step, "outputs": outputs}))
    return d


@pytest.fixture
def work_dir(tmp_path):
    """A work dir with the three steps the bench reads, config files only (no weights)."""
    dpn = _step(tmp_path, "route_calibrate", {"model_dir": "model"}) / "model"
    dpn.mkdir()
    curve = {"bias": [-2.0, 0.0, 2.0], "flops_fraction": [0.9, 0.6, 0.4]}
    (dpn / "config.json").write_text(json.dumps({"compressor": "dpn", "router_token_id": 5, "budget_curve": curve}))
    none = _step(tmp_path, "stage2_none", {"model_dir": "stage2/model"}) / "stage2" / "model"
    none.mkdir(parents=True)
    (none / "config.json").write_text(json.dumps({"compressor": "none"}))
    corpus = _step(tmp_path, "synth", {"corpus": "corpus"}) / "corpus"
    corpus.mkdir()
    (corpus / "manifest.json").write_text(json.dumps({"config": {"seed": 0}}))
    return tmp_path


def _run_bad(pareto, capsys, argv):
    assert pareto.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pareto: error:") and "Traceback" not in err
    return err


def test_bad_input_exits_2_with_one_line(pareto, capsys, tmp_path, work_dir):
    err = _run_bad(pareto, capsys, ["--work-dir", str(tmp_path / "absent")])
    assert "absent" in err
    err = _run_bad(pareto, capsys, ["--work-dir", str(work_dir), "--budgets", "0.5,abc"])
    assert "'0.5,abc'" in err
    err = _run_bad(pareto, capsys, ["--work-dir", str(work_dir), "--budgets", "0.95"])
    assert "0.95" in err and "[0.400, 0.900]" in err
    err = _run_bad(pareto, capsys, ["--work-dir", str(work_dir), "--n-eval", "10"])
    assert "10" in err
    err = _run_bad(pareto, capsys, ["--work-dir", str(work_dir), "--n-eval", "many"])
    assert "many" in err
    err = _run_bad(pareto, capsys, ["--work-dir", str(work_dir), "--budgets", "0.5", "--data-root", str(tmp_path)])
    assert str(tmp_path) in err and "synthetic" in err
    err = _run_bad(pareto, capsys, ["--work-dir", str(work_dir), "--fastv-layer", "0"])
    assert "--fastv-layer" in err and "0" in err
    err = _run_bad(pareto, capsys, ["--budgets", "0.5"])  # no --work-dir
    assert "--work-dir" in err


def test_missing_step_and_default_budgets(pareto, capsys, work_dir):
    import shutil

    wd = pareto.resolve_work_dir(str(work_dir))
    assert wd.budget_range == (0.4, 0.9)
    assert pareto.resolve_budgets(wd, None) == pytest.approx([0.525, 0.65, 0.775])  # 25 / 50 / 75% of the range
    assert pareto.resolve_budgets(wd, [0.4, 0.9]) == [0.4, 0.9]  # both ends are reachable
    # A checkpoint given explicitly replaces the step's; a missing one is named.
    cal = next((work_dir / "pipeline" / "steps" / "route_calibrate").glob("*/model"))
    shutil.rmtree(work_dir / "pipeline" / "steps" / "stage2_none")
    err = _run_bad(pareto, capsys, ["--work-dir", str(work_dir)])
    assert "stage2_none" in err
    none = work_dir / "elsewhere"
    none.mkdir()
    (none / "config.json").write_text(json.dumps({"compressor": "none"}))
    assert pareto.resolve_work_dir(str(work_dir), str(cal), str(none)).none_dir == none
    err = _run_bad(pareto, capsys, ["--work-dir", str(work_dir), "--none-model", str(work_dir / "nope")])
    assert "--none-model" in err and "nope" in err
