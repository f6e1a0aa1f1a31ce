"""The model registry's gate: a newly trained model is registered as `challenger` and promoted to `champion`
only if it beats the current champion on the gate metric at no more FLOPs per sample. The decision is
plain Python (`promotion_decision`); the registry itself is MLflow's, reached through `pipelines.tracking`
like every MLflow call.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from pipelines import tracking

CHAMPION = "champion"
CHALLENGER = "challenger"


def gate_score(results: dict[str, Any], variant: str, gate_metric: str) -> float:
    """The gate metric ("<benchmark>/<metric>") of a variant from the evaluate step's results."""
    bench, _, metric = gate_metric.partition("/")
    acc = results[variant]["accuracy"]
    if bench not in acc:
        raise ValueError(f"gate_metric {gate_metric!r}: benchmark {bench!r} was not evaluated ({sorted(acc)})")
    if metric not in ("accuracy", "primary", ""):
        raise ValueError(f"gate_metric {gate_metric!r}: only '<benchmark>/accuracy' (the primary metric) is gated")
    return float(acc[bench])


def promotion_decision(challenger: dict[str, float], champion: dict[str, float] | None) -> tuple[bool, str]:
    """Promote when there is no champion, or the challenger scores higher at no more FLOPs."""
    if champion is None:
        return True, "no champion yet"
    if challenger["score"] <= champion["score"]:
        return False, f"score {challenger['score']:.4g} does not beat the champion's {champion['score']:.4g}"
    if challenger["tflops"] > champion["tflops"] * (1 + 1e-9):
        return False, f"needs {challenger['tflops']:.4g} TFLOPs per sample > the champion's {champion['tflops']:.4g}"
    return True, f"score {challenger['score']:.4g} > {champion['score']:.4g} at {challenger['tflops']:.4g} <= " \
                 f"{champion['tflops']:.4g} TFLOPs"


def register_and_gate(source_run_id: str, model_name: str, challenger: dict[str, float], *, gate_metric: str,
                      compressor: str, tracking_uri: str, model_dir: str,
                      tmp_dir: str | None = None) -> dict[str, Any]:
    """Log `model_dir` as a pyfunc model on `source_run_id` (`tracking.log_pyfunc_model`: what
    `mlflow.pyfunc.load_model("models:/<name>@champion")` and `mlflow models serve` load), register it as a
    new version of `model_name`, alias it `challenger`, and move `champion` to it when `promotion_decision`
    says so.

    Args:
        source_run_id: the MLflow run that trained (or calibrated) the model.
        model_name: the registered model.
        challenger: {"score": gate score, "tflops": prefill TFLOPs per sample} of the new model.
        gate_metric / compressor: recorded as tags of the version.
        tracking_uri: the store (also the registry).
        model_dir: the model's `save_pretrained` directory (the dpn budget is the one saved in it).
        tmp_dir: where the pyfunc is assembled before the upload (the step's scratch dir, which the pipeline
            cleans; default: the system's temporary directory).
    Returns:
        {"version", "promoted", "reason", "champion"}: champion is the previous champion's
        {"score", "tflops"}, None when there was none.
    """
    from pipelines.serving import DEFAULT_MAX_NEW_TOKENS, DPNPyfunc, ServingConfig

    # A path of its own per registration: a re-run of the register step (a scorer fix re-runs it alone, the
    # source run stays cached) must never rewrite the files an earlier version (maybe the champion) points at.
    artifact_path = f"{tracking.PYFUNC_ARTIFACT}/{uuid.uuid4().hex[:12]}"
    config = ServingConfig(compressor=compressor)  # validated before anything is written
    tracking.log_pyfunc_model(source_run_id, model_dir, python_model=DPNPyfunc(),
                              model_config=dataclasses.asdict(config),
                              params={"max_new_tokens": DEFAULT_MAX_NEW_TOKENS}, artifact_path=artifact_path,
                              tracking_uri=tracking_uri, tmp_dir=tmp_dir)
    version = tracking.register_model(source_run_id, model_name, artifact_path=artifact_path,
                                      tracking_uri=tracking_uri,
                                      tags={"gate_metric": gate_metric, "gate_score": challenger["score"],
                                            "tflops_per_sample": challenger["tflops"], "compressor": compressor})
    tracking.set_alias(model_name, CHALLENGER, version, tracking_uri=tracking_uri)
    current = tracking.get_alias(model_name, CHAMPION, tracking_uri=tracking_uri)
    champion = None
    if current is not None and current["version"] != version:
        tags = current["tags"]
        champion = {"score": float(tags["gate_score"]), "tflops": float(tags["tflops_per_sample"])}
    promote, why = promotion_decision(challenger, champion)
    if promote:
        tracking.set_alias(model_name, CHAMPION, version, tracking_uri=tracking_uri)
    return {"version": version, "promoted": promote, "reason": why, "champion": champion}


__all__ = ["CHALLENGER", "CHAMPION", "gate_score", "promotion_decision", "register_and_gate"]
