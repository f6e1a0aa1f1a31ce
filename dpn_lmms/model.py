"""`DPNLmms`: a DPN checkpoint as an lmms-eval 0.7 model (registered as `dpn`, see `dpn_lmms`).

    lmms-eval eval --model dpn --model_args pretrained=DIR,compressor=dpn,budget=0.6 --tasks TASK

Model args (lmms-eval's `--model_args`, comma-separated `key=value`):
    pretrained   our checkpoint directory (config.json, weights, tokenizer files or `tokenizer/`)
    compressor   dpn | static | none | fastv | pdrop (default: the one the checkpoint was saved with)
    path         a fixed routing path, compression factor per DPE in the path notation ("4-2-1"): every
                 sample takes it instead of its router's choice (pooling compressors only)
    budget       the dpn routers' compute budget, a fraction of the uncompressed prefill FLOPs the
                 checkpoint's calibrated curve reaches (`dpn eval run --budget`)
    tokenizer    a tokenizer directory, when the checkpoint holds none
    template     the prompt template (vicuna_v1, LLaVA-1.5's)
    dtype        float32 | bfloat16 | float16
plus lmms-eval's own `--batch_size` and `--device`.

Requests are answered exactly as `dpn eval run` answers a question (`dpn.inference`): the task's context
is the question, written into the template by `DPNProcessor` (`<image>` first, `<ROUTER>` for dpn),
generation is greedy and batched (`generate_batches`), log-likelihoods come from one batched forward
pass per batch (`continuation_logprobs`). One image per question (LLaVA-1.5's input); video is refused.
Multi-process (accelerate) evaluation is not supported: one process, one device.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms

from dpn.compressors import COMPRESSORS, POOLING, parse_path
from dpn.inference import (
    DTYPES,
    check_checkpoint,
    continuation_logprobs,
    decode_answer,
    generate_batches,
    load_model_and_processor,
)

# lmms-eval's tasks set max_new_tokens; this is for those that do not (LLaVA-1.5's eval scripts use 128).
DEFAULT_MAX_NEW_TOKENS = 128
# Generation settings that are greedy decoding whatever their value, or that greedy decoding ignores.
_GREEDY_KEYS = {"max_new_tokens", "until", "temperature", "do_sample", "num_beams", "top_p", "top_k", "use_cache"}


class DPNLmms(lmms):
    """A DPN checkpoint as an lmms-eval model; see the module docstring for the model args."""

    is_simple = True

    def __init__(self, pretrained: str, compressor: str | None = None, path: str | int | None = None,
                 budget: float | None = None, tokenizer: str | None = None, template: str = "vicuna_v1",
                 dtype: str = "float32", device: str | None = None, batch_size: int | str = 8,
                 max_batch_size: int | None = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"dpn model args: unknown {sorted(unknown)}; known: pretrained, compressor, path, budget, "
                             "tokenizer, template, dtype (plus lmms-eval's batch_size and device)")
        saved = check_checkpoint(pretrained, "none")
        self.compressor = compressor or saved.get("compressor", "dpn")
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"compressor must be one of {COMPRESSORS}, got {self.compressor!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        # lmms-eval turns "421" into an int; the path notation is dashed ("4-2-1"), commas split model args.
        self.path = None if path is None else parse_path(str(path))
        if self.path is not None and self.compressor not in POOLING:
            raise ValueError(f"path {path!r} fixes the pooling pyramid; compressor {self.compressor!r} does not pool")
        try:
            self.budget = None if budget is None else float(budget)
        except ValueError:
            raise ValueError(f"budget must be a number in (0, 1], got {budget!r}") from None
        # Every check the checkpoint allows before its weights load: router weights for dpn, the budget in
        # the calibrated range, the path's length against the DPE layers.
        check_checkpoint(pretrained, self.compressor, self.budget if self.compressor == "dpn" else None)
        n_dpe = len(saved.get("dpe_layers") or ())  # every DPNConfig saves its DPE layers
        if self.path is not None and len(self.path) != n_dpe:
            raise ValueError(f"path {path!r} has {len(self.path)} factor(s); the model has {n_dpe} DPE layers")
        try:
            self.batch_size_per_device = int(batch_size)
        except ValueError:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}") from None
        if self.batch_size_per_device < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self._device = device or "cpu"
        self._model, self.processor = load_model_and_processor(
            pretrained, self.compressor, tokenizer_dir=tokenizer, template=template, dtype=dtype,
            device=self._device, budget=self.budget)

    # ----- what lmms-eval reads ---------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    @property
    def device(self) -> str:
        return self._device

    # ----- requests ---------------------------------------------------------------------------------
    def _image(self, doc_to_visual, task: str, split: str, doc_id: int):
        """The request's one image (RGB) or None; several images or a video raise ValueError."""
        from PIL import Image

        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) > 1:
            raise ValueError(f"{task} doc {doc_id}: {len(visuals)} visuals; DPN takes one image per question")
        if not visuals:
            return None
        if not isinstance(visuals[0], Image.Image):
            raise ValueError(f"{task} doc {doc_id}: visual is a {type(visuals[0]).__name__}, not an image "
                             "(video and audio are not supported)")
        return visuals[0].convert("RGB")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, batched; requests with the same generation settings share batches."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(_generation_settings(req.args[1]), sort_keys=True), []).append(i)
        answers: list[str | None] = [None] * len(requests)
        for key, indices in groups.items():
            settings = json.loads(key)
            samples = []
            for i in indices:
                context, _, doc_to_visual, doc_id, task, split = requests[i].args
                image = self._image(doc_to_visual, task, split, doc_id)
                samples.append(self.processor.encode(context, image, add_router_token=self.compressor == "dpn"))
            for start, out in generate_batches(self._model, self.processor, samples, batch_size=self.batch_size,
                                               max_new_tokens=settings["max_new_tokens"], path=self.path):
                for b in range(out.sequences.shape[0]):
                    i = indices[start + b]
                    answers[i] = _cut(decode_answer(out, b, self.tokenizer), settings["until"])
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]),
                                                answers[i])
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(log P(continuation | context), whether greedy decoding gives the continuation), batched.

        Each pair goes back wrapped in a `GenerationResult`: lmms-eval 0.7.3's evaluator passes every model
        output through `unwrap_generation_output`, which turns a plain (float, bool) tuple into its string
        "(-1.2, False)" and breaks multiple-choice scoring; a `GenerationResult`'s payload passes unchanged."""
        triples = []
        for req in requests:
            context, target, doc_to_visual, doc_id, task, split = req.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            if isinstance(continuation, list):  # doc_to_target may give the answer as a one-element list
                continuation = continuation[0]
            triples.append((context, self._image(doc_to_visual, task, split, doc_id), str(continuation)))
        if self.path is not None:
            raise ValueError("path is not supported for log-likelihood requests (the forward pass routes itself)")
        scores = continuation_logprobs(self._model, self.processor, triples, compressor=self.compressor,
                                       batch_size=self.batch_size)
        return [GenerationResult(text=score) for score in scores]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the dpn model answers single-turn requests (generate_until, loglikelihood)")


def _generation_settings(gen_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """{max_new_tokens, until} of a request; sampling or beam search raise ValueError (greedy only, as
    `dpn eval run` answers)."""
    kw = dict(gen_kwargs or {})
    unknown = sorted(set(kw) - _GREEDY_KEYS)
    if unknown:
        raise ValueError(f"generation_kwargs {unknown} are not supported (greedy decoding: max_new_tokens, until)")
    if kw.get("do_sample") or float(kw.get("temperature") or 0) > 0 or int(kw.get("num_beams") or 1) > 1:
        raise ValueError(f"the dpn model decodes greedily; got do_sample={kw.get('do_sample')}, "
                         f"temperature={kw.get('temperature')}, num_beams={kw.get('num_beams')}")
    until = kw.get("until") or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, list) or not all(isinstance(u, str) for u in until):
        raise ValueError(f"generation_kwargs until must be a string or a list of strings, got {until!r}")
    max_new = kw.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise ValueError(f"generation_kwargs max_new_tokens must be an integer >= 1, got {max_new!r}")
    return {"max_new_tokens": max_new, "until": until}


def _cut(text: str, until: Sequence[str]) -> str:
    """`text` up to the first stop sequence (generation itself stops at EOS), stripped as answers are."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text.strip()


__all__ = ["DPNLmms"]
