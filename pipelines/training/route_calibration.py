"""The pipeline's `route_calibrate` step: fit the dpn model's routers (counterfactual objective) and its
compute-budget curve on held-out data, then set the pipeline's budget (`dpn.routing` does the model work;
this module reads the shards, runs it as a Ray task and writes the calibrated checkpoint).

    stage-2 dpn model + preprocessed calibration shards
        -> calibration pass (every held-out image sample down every path: loss, FLOPs fraction, router inputs)
        -> [router_objective == "counterfactual"] fit the routers to the per-path costs
        -> budget curve (mean FLOPs fraction vs route_bias, replayed) -> budget -> save_pretrained
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, with_config

from pipelines.validation import STRICT, check_fields


@with_config(STRICT)
@dataclass(kw_only=True)
class CalibrationSpec:
    """What `calibrate` does; the pipeline's `routing` section (`pipelines.workflow.PipelineConfig.routing`)."""

    budget: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    """Target mean LLM prefill FLOPs (fraction of the uncompressed model) of the calibrated model; None:
    the routers' own choice (bias 0), with the curve stored so `dpn eval --budget` can steer it later."""
    samples: Annotated[int, Field(ge=1)] = 256
    """Held-out image samples of the calibration pass (each runs down every path: 27 forwards)."""
    compute_price: Annotated[float, Field(ge=0.0, le=1e6)] | None = None
    """mu of the counterfactual targets (cost = loss + mu * FLOPs fraction); None: the price at which the
    per-sample least-cost paths meet `budget` (or `default_fraction` without a budget)."""
    default_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.7
    """The FLOPs fraction that sets mu when neither `budget` nor `compute_price` is given."""
    tau: Annotated[float, Field(gt=0.0, le=1e3)] = 0.05
    """Temperature of the soft targets softmax(-cost-to-go / tau), in loss units (nats)."""
    fit_steps: Annotated[int, Field(ge=1)] = 400
    batch_size: Annotated[int, Field(ge=1)] = 32
    seed: Annotated[int, Field(ge=0)] = 0

    def __post_init__(self) -> None:
        check_fields(self, "routing")


def _batches(shards: str, n: int, batch_size: int) -> list[dict[str, Any]]:
    """The first `n` image rows of the calibration shards (their stored order), as model batches."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.data.loader import iter_micro_batches, open_shards

    info = open_shards(shards)
    table = pa.concat_tables([pq.read_table(f) for f in info.files])
    has_image = np.asarray(table.column(info.image_column).is_valid())
    rows = np.nonzero(has_image)[0][:n]
    if len(rows) == 0:
        raise ValueError(f"calibration shards {shards} hold no image sample")
    table = table.take(rows)
    return list(iter_micro_batches(table, info, micro_batch_size=batch_size, seed=0, epoch=0, group_by_length=True))


def calibrate(model_dir: str, shards: str, spec: CalibrationSpec, out_dir: str, threads: int = 1) -> dict[str, Any]:
    """Calibrate the dpn checkpoint `model_dir` on `shards`; write it (tokenizer files included) to
    `out_dir`; return the report (objective, samples, fit, curve, budget, bias, seconds)."""
    import torch

    from dpn.modeling_dpn import DPNForConditionalGeneration
    from dpn.routing import budget_curve, calibration_pass, fit_routers, mu_for_fraction, set_budget

    torch.set_num_threads(threads)
    torch.manual_seed(spec.seed)
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = DPNForConditionalGeneration.from_pretrained(model_dir).to(device).eval()
    if model.config.compressor != "dpn":
        raise ValueError(f"{model_dir}: route calibration needs a dpn model, got compressor {model.config.compressor!r}")
    batches = _batches(shards, spec.samples, spec.batch_size)
    counterfactual = model.config.router_objective == "counterfactual"
    tables = calibration_pass(model, batches, losses=counterfactual)
    t_pass = time.perf_counter() - t0
    report: dict[str, Any] = {"objective": model.config.router_objective, "samples": tables.num_samples,
                              "pass_seconds": round(t_pass, 2)}
    if counterfactual:
        mu = spec.compute_price
        if mu is None:
            mu = mu_for_fraction(tables, spec.budget if spec.budget is not None else spec.default_fraction)
        fit = fit_routers(model, tables, mu=mu, tau=spec.tau, steps=spec.fit_steps, seed=spec.seed)
        report["fit"] = asdict(fit)
    curve = budget_curve(model, tables)
    try:
        bias = set_budget(model, spec.budget, curve)
    except ValueError as e:
        raise ValueError(f"routing.budget: {e}") from None
    report.update({"budget": spec.budget, "route_bias": bias, "reachable": list(model.config.budget_range()),
                   "curve": curve})
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to("cpu").save_pretrained(tmp)
    for f in Path(model_dir).iterdir():  # the tokenizer and the processor travel with the model
        if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "processor_config")):
            shutil.copy2(f, tmp / f.name)
    (tmp / "route_calibration.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def calibrate_on_ray(model_dir: str, shards: str, spec: CalibrationSpec, out_dir: str, use_gpu: bool = False
                     ) -> dict[str, Any]:
    """`calibrate` as a one-CPU Ray task (a local Ray is started if none is up)."""
    import ray

    if not ray.is_initialized():
        ray.init()
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(calibrate)
    return ray.get(task.remote(model_dir, shards, spec, out_dir))


__all__ = ["CalibrationSpec", "calibrate", "calibrate_on_ray"]
