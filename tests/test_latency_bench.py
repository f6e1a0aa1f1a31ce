"""`bench/latency.py` on CPU at tiny geometry: every row is measured at every batch size, the FLOPs the model
reported match the analytic pyramid, budgets are emulated by path mixes that hit their FLOPs fraction, and
the markdown names the device it was measured on."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "latency.py"


def _latency_module():
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("latency", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_budget_mix_hits_the_budget_between_the_bracketing_paths():
    lat = _latency_module()
    fractions = {(1, 1, 1): 1.0, (2, 1, 1): 0.8, (2, 2, 1): 0.6, (4, 2, 1): 0.45}
    mix = lat.budget_mix(fractions, 0.7, 8)
    assert sorted(set(mix)) == [(2, 1, 1), (2, 2, 1)]
    assert sum(fractions[p] for p in mix) / 8 == pytest.approx(0.7)
    assert lat.budget_mix(fractions, 0.1, 4) == [(4, 2, 1)] * 4  # below the reachable range: the cheapest
    assert lat.budget_mix(fractions, 1.0, 2) == [(1, 1, 1)] * 2


def test_latency_bench_runs_on_cpu_at_tiny_geometry(tmp_path):
    md = tmp_path / "latency.md"
    cmd = [sys.executable, str(BENCH), "--device", "cpu", "--geometry", "llava-hr-tiny", "--batch-sizes", "1,2",
           "--paths", "4-2-1", "--budgets", "0.6", "--methods", "none,dpn,fastv", "--repeats", "2", "--warmup", "0",
           "--decode-tokens", "2", "--markdown", str(md)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["device"] == "cpu"
    (geo,) = result["geometries"]
    assert geo["geometry"] == "llava-hr-tiny" and geo["visual_tokens"] == 64 and geo["gpu"] is None
    rows = {(r["method"], r["batch"]): r for r in geo["rows"]}
    names = {"baseline", "dpn 4-2-1 (forced)", "fastv K=2 R=0.5", "dpn budget 0.6 (emulated)"}
    assert set(rows) == {(n, b) for n in names for b in (1, 2)}
    for r in rows.values():
        assert 0 < r["ttft_ms_p50"] <= r["ttft_ms_p99"] and r["decode_tokens_per_s"] > 0 and len(r["ttft_ms_all"]) == 2
        assert r["peak_memory_gib"] is None  # CPU: not measured
    fractions = geo["path_flops_fractions"]
    forced = rows[("dpn 4-2-1 (forced)", 2)]
    assert forced["flops_saving"] == pytest.approx(1 - fractions["4-2-1"], abs=1e-9)
    assert rows[("baseline", 1)]["flops_saving"] == 0.0
    budget = rows[("dpn budget 0.6 (emulated)", 2)]
    assert budget["paths"] and 1 - budget["flops_saving"] == pytest.approx(
        sum(fractions[p] for p in budget["paths"][:2]) / 2, abs=1e-9)
    text = md.read_text()
    assert "Device: " in text and "CPU" in text and "llava-hr-tiny" in text


def test_bad_arguments_are_refused():
    run = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--geometry", "llava-9b"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "llava-9b" in run.stderr
