"""The registered model as an MLflow pyfunc: `mlflow.pyfunc.load_model("models:/<name>@champion")` and
`mlflow models serve` answer questions about images with it.

The pyfunc wraps the `save_pretrained` directory (an artifact of the MLflow model) and answers through
`dpn.inference` exactly as `dpn eval run` does (greedy, batched, the DPNProcessor prompt). Input: a
DataFrame with `image` (a file path or the encoded image's bytes; empty for a text-only question) and
`question`; output: a DataFrame with `answer`. The compressor and the dpn routers' budget come from the
MLflow model's config (`model_config`), set when the model is logged (`pipelines.tracking.log_pyfunc_model`).

This module defines the model class only; logging it is `pipelines.tracking`'s job (one module talks to
MLflow), and it is imported lazily there, so nothing here runs at import time beyond the class itself.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

import mlflow.pyfunc

from dpn.compressors import COMPRESSORS

HF_ARTIFACT = "hf_model"  # the artifact key of the save_pretrained directory inside the MLflow model
DEFAULT_MAX_NEW_TOKENS = 16  # `dpn eval run`'s default


@dataclass(kw_only=True)
class ServingConfig:
    """How the served model answers: the MLflow model's `model_config`."""

    compressor: str
    """dpn | static | none | fastv | pdrop: the compressor the model runs with."""
    budget: float | None = None
    """The dpn routers' compute budget (fraction of the uncompressed prefill FLOPs); None: the checkpoint's."""
    batch_size: int = 8
    """Questions answered per forward pass."""

    def __post_init__(self) -> None:
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"compressor must be one of {COMPRESSORS}, got {self.compressor!r}")
        if self.budget is not None and not 0 < float(self.budget) <= 1:
            raise ValueError(f"budget must be in (0, 1], got {self.budget!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")


class DPNPyfunc(mlflow.pyfunc.PythonModel):
    """Answers (image, question) rows with a DPN checkpoint; see the module docstring."""

    def load_context(self, context) -> None:
        from dpn.inference import load_model_and_processor

        self.config = ServingConfig(**(context.model_config or {}))
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
    JSON carries to the scoring server); None for an empty value (a text-only question)."""
    import binascii
    from pathlib import Path

    from PIL import Image, UnidentifiedImageError

    if value is None or (isinstance(value, float) and value != value) or (isinstance(value, str | bytes) and not value):
        return None
    if isinstance(value, str):
        try:
            is_file = Path(value).is_file()
        except OSError:  # e.g. base64 text longer than a file name may be
            is_file = False
        if is_file:
            with Image.open(value) as img:
                return img.convert("RGB")
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"row {row}: image {value[:80]!r} is neither an existing file nor base64 image bytes"
                             ) from None
    if not isinstance(value, bytes | bytearray):
        raise ValueError(f"row {row}: image must be a path or bytes, got {type(value).__name__}")
    try:
        return Image.open(io.BytesIO(value)).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"row {row}: image bytes are not a readable image ({e})") from e


__all__ = ["DEFAULT_MAX_NEW_TOKENS", "DPNPyfunc", "HF_ARTIFACT", "ServingConfig"]
