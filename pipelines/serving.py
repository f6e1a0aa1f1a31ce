"""The registered model as an MLflow pyfunc: `mlflow.pyfunc.load_model("models:/<name>@champion")` and
`mlflow models serve` answer questions about images with it.

The pyfunc wraps the `save_pretrained` directory (an artifact of the MLflow model) and answers through
`dpn.inference` exactly as `dpn eval run` does (greedy, batched, the DPNProcessor prompt). Input: a
DataFrame with `image` (a file path or the encoded image's bytes; empty for a text-only question) and
`question`; output: a DataFrame with `answer`. The compressor and the dpn routers' budget come from the
MLflow model's config (`model_config`), set when the model is logged (`pipelines.tracking.log_pyfunc_model`).

This module defines the model class only; logging it is `pipelines.tracking`'s job (one module talks to
MLflow), called by `pipelines.registry`, which imports this module lazily (only the register step's code
key covers the inference code it reaches); nothing here runs at import time beyond the class itself.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Annotated, Any

import mlflow.pyfunc
from pydantic import Field, with_config

from dpn.compressors import COMPRESSORS
from pipelines.tracking import HF_ARTIFACT
from pipelines.validation import STRICT, ConfigError, build, check_fields

DEFAULT_MAX_NEW_TOKENS = 16  # `dpn eval run`'s default


@with_config(STRICT)
@dataclass(kw_only=True)
class ServingConfig:
    """How the served model answers: the MLflow model's `model_config` (validated as the pipeline's
    configs are: strict types, no NaN / inf, unknown keys named, every problem at once)."""

    compressor: str
    """dpn | static | none | fastv | pdrop: the compressor the model runs with."""
    budget: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    """The dpn routers' compute budget (fraction of the uncompressed prefill FLOPs); None: the checkpoint's."""
    batch_size: Annotated[int, Field(ge=1)] = 8
    """Questions answered per forward pass."""

    def __post_init__(self) -> None:
        check_fields(self, "model_config")
        if self.compressor not in COMPRESSORS:
            raise ConfigError([f"model_config.compressor: must be one of {', '.join(COMPRESSORS)}, "
                               f"got {self.compressor!r}"])


class DPNPyfunc(mlflow.pyfunc.PythonModel):
    """Answers (image, question) rows with a DPN checkpoint; see the module docstring."""

    def load_context(self, context) -> None:
        from dpn.inference import load_model_and_processor

        self.config = build(ServingConfig, context.model_config or {}, prefix="model_config.")
        self.model, self.processor = load_model_and_processor(
            context.artifacts[HF_ARTIFACT], self.config.compressor, budget=self.config.budget)

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        from dpn.inference import decode_answer, generate_batches

        max_new_tokens = int((params or {}).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        frame = pd.DataFrame(model_input)
        missing = {"image", "question"} - set(frame.columns)
        if missing:
            raise ValueError(f"input needs the columns image and question; missing {sorted(missing)}")
        samples = []
        for i, row in enumerate(frame.itertuples(index=False)):
            if not isinstance(row.question, str) or not row.question.strip():
                raise ValueError(f"row {i}: question must be a non-empty string, got {row.question!r}")
            samples.append(self.processor.encode(row.question, _open_image(row.image, i),
                                                 add_router_token=self.config.compressor == "dpn"))
        answers = [""] * len(samples)
        for start, out in generate_batches(self.model, self.processor, samples, batch_size=self.config.batch_size,
                                           max_new_tokens=max_new_tokens):
            for b in range(out.sequences.shape[0]):
                answers[start + b] = decode_answer(out, b, self.processor.tokenizer)
        return pd.DataFrame({"answer": answers})


def _open_image(value: Any, row: int):
    """An RGB PIL image from a file path, the encoded image's bytes, or those bytes as base64 text (what
    JSON carries to the scoring server); None for an empty value (a text-only question). Opened as every
    benchmark image is (`EvalItem.open_image`: regular files only, pixel cap)."""
    import binascii
    from pathlib import Path

    from dpn.eval.benchmarks import EvalItem

    if value is None or (isinstance(value, float) and value != value) or (isinstance(value, str | bytes) and not value):
        return None
    if isinstance(value, str):
        try:
            exists = Path(value).exists()
        except OSError:  # e.g. base64 text longer than a file name may be
            exists = False
        if exists:
            item = EvalItem(question_id=row, text="", image=value)
        else:
            try:
                item = EvalItem(question_id=row, text="", image_bytes=base64.b64decode(value, validate=True))
            except (binascii.Error, ValueError):
                raise ValueError(f"row {row}: image {value[:80]!r} is neither an existing file nor base64 "
                                 "image bytes") from None
    elif isinstance(value, bytes | bytearray):
        item = EvalItem(question_id=row, text="", image_bytes=bytes(value))
    else:
        raise ValueError(f"row {row}: image must be a path or bytes, got {type(value).__name__}")
    try:
        return item.open_image()
    except (ValueError, OSError) as e:  # EvalDataError; a truncated file fails when it is decoded
        raise ValueError(f"row {row}: image not readable ({e})") from None


__all__ = ["DEFAULT_MAX_NEW_TOKENS", "DPNPyfunc", "ServingConfig"]
