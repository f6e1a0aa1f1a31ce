"""Inference on one device: load a checkpoint for a compressor (checked first, so that nothing is silently
initialised at random) and answer questions with greedy batched generation.

    model, processor = load_model_and_processor(model_dir, "dpn")
    records = predict(model, processor, items, compressor="dpn", benchmark="synthetic", model_id="m")

No Ray, no MLflow: the evaluation fan-out (`pipelines.evaluation.fanout`) runs this in every worker, and
a serving path, an MLflow pyfunc model or an lmms-eval plugin would call the same functions.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpn.compressors import COMPRESSORS, format_path
from dpn.constants import ROUTER_TOKEN
from dpn.eval.benchmarks import EvalItem, answer_record
from dpn.eval.scoring import EvalDataError

DTYPES = ("float32", "bfloat16", "float16")


def find_tokenizer_dir(model_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """`tokenizer_dir` if given, else `model_dir` when it holds tokenizer files (our checkpoints do), else
    `model_dir/tokenizer`. Raises FileNotFoundError naming the directories looked in."""
    if tokenizer_dir is not None:
        path = Path(tokenizer_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer_dir {path} is not a directory")
        return path
    model_dir = Path(model_dir)
    for candidate in (model_dir, model_dir / "tokenizer"):
        if (candidate / "tokenizer_config.json").is_file() or (candidate / "tokenizer.json").is_file():
            return candidate
    raise FileNotFoundError(f"no tokenizer in {model_dir} or {model_dir / 'tokenizer'}; pass tokenizer_dir")


def _checkpoint_keys(model_dir: Path) -> set[str] | None:
    """Weight names of a safetensors checkpoint (headers only), or None when it is not one."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    single = model_dir / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return set(f.keys())
    return None


def check_checkpoint(model_dir: str | os.PathLike, compressor: str, budget: float | None = None) -> dict[str, Any]:
    """Validate that `model_dir` can run with `compressor` (and `budget`) without loading the weights;
    returns its config.json. A `dpn` run of a checkpoint without router weights (trained as "none" or
    "static") would silently route with random routers, so it is an error here, as is a budget the
    checkpoint's calibrated curve does not reach (the message names the reachable range)."""
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{model_dir}: not a save_pretrained directory (no config.json)")
    config = json.loads(config_file.read_text())
    if compressor not in COMPRESSORS:
        raise ValueError(f"compressor must be one of {COMPRESSORS}, got {compressor!r}")
    if compressor == "dpn":
        keys = _checkpoint_keys(model_dir)
        if keys is not None and not any(k.startswith("routers.") for k in keys):
            raise ValueError(
                f"{model_dir} has no router weights (saved with compressor={config.get('compressor')!r}); "
                "the dpn compressor needs a checkpoint trained with routers. Evaluate it with "
                "static / none / fastv / pdrop instead."
            )
        if config.get("router_token_id") is None:
            raise ValueError(
                f"{model_dir}/config.json has no router_token_id: the <ROUTER> token appended to dpn prompts "
                "would not be where the router reads; set it to the tokenizer's <ROUTER> id"
            )
    if budget is not None:
        if compressor != "dpn":
            raise ValueError(f"a budget steers dpn routers; compressor {compressor!r} has none")
        curve = config.get("budget_curve")
        if not curve:
            raise ValueError(f"{model_dir} has no budget_curve: calibrate it first (the pipeline's route_calibrate "
                             "step, or dpn.routing.budget_curve)")
        lo, hi = min(curve["flops_fraction"]), max(curve["flops_fraction"])
        if not lo - 1e-9 <= budget <= hi + 1e-9:
            raise ValueError(f"budget {budget:g} is outside what {model_dir}'s routing paths reach on its calibration "
                             f"data: [{lo:.3f}, {hi:.3f}] of the uncompressed model's prefill FLOPs")
    return config


def load_model(model_dir: str | os.PathLike, compressor: str, dtype: str = "float32", device: str = "cpu",
               budget: float | None = None, **config_overrides: Any):
    """`DPNForConditionalGeneration.from_pretrained(model_dir, compressor=compressor)` in eval mode, with
    the dpn routers steered to `budget` when given (else the checkpoint's own) and further config fields
    overridden (e.g. `random_path_shares` for compressor "random").

    Raises ValueError when the checkpoint lacks weights the compressor needs (e.g. routers for `dpn`),
    instead of transformers' default of initialising them randomly with a warning.
    """
    import torch
    from transformers.utils import logging as hf_logging

    from dpn.modeling_dpn import DPNForConditionalGeneration

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if budget is not None:
        config_overrides["budget"] = budget
    # Our checkpoints load quietly: no per-tensor progress bar (transformers' is process-wide, so it is put
    # back as it was); key mismatches are errors below, not a report.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model, info = DPNForConditionalGeneration.from_pretrained(
            str(model_dir), compressor=compressor, dtype=getattr(torch, dtype), output_loading_info=True,
            **config_overrides,
        )
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        hint = (
            " (no router weights: the checkpoint was not trained with compressor='dpn')"
            if any(k.startswith("routers.") for k in missing)
            else ""
        )
        raise ValueError(
            f"{model_dir}: loading with compressor={compressor!r} leaves {len(missing)} weight(s) uninitialised"
            f"{hint}, e.g. {missing[:4]}"
        )
    return model.to(device).eval()


def load_model_and_processor(model_dir: str | os.PathLike, compressor: str, *,
                             tokenizer_dir: str | os.PathLike | None = None, template: str = "vicuna_v1",
                             dtype: str = "float32", device: str = "cpu", budget: float | None = None):
    """`load_model` plus the matching `DPNProcessor` (the tokenizer from `find_tokenizer_dir`). For dpn,
    the tokenizer's `<ROUTER>` id must be the one the model's router reads (ValueError otherwise)."""
    from dpn.processing_dpn import DPNProcessor
    from dpn.tokenizer import load_tokenizer

    model = load_model(model_dir, compressor, dtype=dtype, device=device, budget=budget)
    tokenizer_dir = find_tokenizer_dir(model_dir, tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    if compressor == "dpn":
        router_id = tokenizer.convert_tokens_to_ids(ROUTER_TOKEN)
        if router_id != model.config.router_token_id:
            raise ValueError(
                f"{model_dir}: router_token_id {model.config.router_token_id} differs from the tokenizer's "
                f"{ROUTER_TOKEN} id {router_id} ({tokenizer_dir})"
            )
    return model, DPNProcessor.from_model_config(model.config, tokenizer, template=template)


def path_label(experts: Sequence[int], factors: Sequence[int]) -> str:
    """Routing path as compression factors per DPE, e.g. [2, 1, 0] with factors [1, 2, 4] -> "4-2-1";
    a DPE that did not pool the sample (-1) shows as "n"."""
    return format_path([None if int(j) < 0 else factors[int(j)] for j in experts])


def generate_batches(model, processor, samples: Sequence[dict[str, Any]], *, batch_size: int = 8,
                     max_new_tokens: int = 16, path: Sequence[int] | None = None):
    """Greedy generation over `samples` (`DPNProcessor.encode` outputs, `<ROUTER>` already appended for
    dpn), `batch_size` at a time, left padded. Yields `(start, GenerationOutput)` per batch, `start` the
    index of the batch's first sample. `path` (compression factor per DPE, e.g. [4, 2, 1]) sends every
    sample down that path instead of its router's choice.

    The one generation loop of the package: `predict` (the evaluation), the lmms-eval model
    (`dpn_lmms.model`) and the MLflow pyfunc (`pipelines.serving`) all answer through it."""
    import torch

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    config = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    forced = None if path is None else torch.tensor([config.expert_index(int(f)) for f in path])
    tokenizer = processor.tokenizer
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        inputs = processor.pad(batch)
        pixel_values = inputs.get("pixel_values")
        out = model.generate(
            inputs["input_ids"].to(device),
            pixel_values=None if pixel_values is None else pixel_values.to(device=device, dtype=dtype),
            attention_mask=inputs["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True,
            force_path=None if forced is None else forced.expand(len(batch), -1).to(device),
        )
        yield start, out


def decode_answer(out, b: int, tokenizer) -> str:
    """Sample `b`'s generated answer in a `GenerationOutput`: its new tokens up to (without) EOS, decoded
    without special tokens and stripped, as LLaVA's eval scripts write answers."""
    n_new = int(out.num_new_tokens[b])
    tokens = out.new_tokens[b, :n_new].tolist()
    eos = tokenizer.eos_token_id
    if tokens and eos is not None and tokens[-1] == eos:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def predict(
    model,
    processor,
    items: Sequence[EvalItem],
    *,
    compressor: str,
    benchmark: str,
    model_id: str,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    answer_salt: str = "",
    path: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Answer `items` with greedy batched generation (`generate_batches`); returns LLaVA answer records
    in item order.

    Inputs come from `processor` (a `DPNProcessor`: its template, `<ROUTER>` for the dpn compressor, left
    padded). `metadata` of each record holds the per-sample measurements (routing path, tokens per layer,
    prefill TFLOPs, category, difficulty). `answer_id` is derived from `answer_salt` and the question id,
    so a re-run writes identical files. `path` (compression factor per DPE, e.g. [4, 2, 1]) sends every
    sample down that path instead of its router's choice (the fixed paths of a dpn model's own weights).
    """
    samples = []
    for item in items:
        try:
            image = item.open_image() if item.has_image else None
            samples.append(processor.encode(item.text, image, add_router_token=compressor == "dpn"))
        except (OSError, ValueError) as e:
            raise EvalDataError(f"{benchmark} question {item.question_id!r}: {e}") from e
    records: list[dict[str, Any]] = []
    for start, out in generate_batches(model, processor, samples, batch_size=batch_size,
                                       max_new_tokens=max_new_tokens, path=path):
        batch = items[start : start + batch_size]
        records += _answer_records(out, batch, processor.tokenizer, model.config, compressor=compressor,
                                   benchmark=benchmark, model_id=model_id, answer_salt=answer_salt)
    return records


def continuation_logprobs(model, processor, requests: Sequence[tuple[str, Any, str]], *, compressor: str,
                          batch_size: int = 8) -> list[tuple[float, bool]]:
    """Log-likelihood of each continuation after its prompt: `requests` holds (question, image or None,
    continuation); the prompt is the question in the processor's template (as `generate_batches` answers
    it), the continuation the text after "ASSISTANT:" (e.g. " A"). Returns per request (sum of the
    continuation tokens' log-probabilities, whether greedy decoding would produce exactly them).

    Tokens: prompt + continuation are tokenized together and split after the prompt's tokens (lm-eval's
    convention: a BPE merge across the boundary stays with the continuation). The router reads what it
    reads at generation (`<ROUTER>`, else the last prompt token), so routing equals `generate_batches`'."""
    import torch

    from dpn.constants import IGNORE_INDEX

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    router = compressor == "dpn"
    encoded = []
    for question, image, continuation in requests:
        if not continuation:
            raise ValueError(f"an empty continuation has no log-likelihood (question {question!r})")
        prompt = processor.encode(question, image, add_router_token=router)
        whole = processor.encode(question, image, add_router_token=router, continuation=continuation)
        n_prompt = len(prompt["input_ids"])
        if whole["input_ids"][:n_prompt] != prompt["input_ids"]:
            # The continuation merged with the prompt's last token: keep the prompt's tokens, then the rest.
            n_prompt = next(i for i, (a, b) in enumerate(zip(prompt["input_ids"], whole["input_ids"], strict=False))
                            if a != b)
        if len(whole["input_ids"]) <= n_prompt:
            raise ValueError(f"continuation {continuation!r} adds no token to the prompt of {question!r}")
        whole["labels"] = [IGNORE_INDEX] * n_prompt + whole["input_ids"][n_prompt:]
        encoded.append(whole)
    results: list[tuple[float, bool]] = []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        inputs = processor.pad(batch, keep_labels=True)
        pixel_values = inputs.get("pixel_values")
        with torch.no_grad():
            out = model(
                inputs["input_ids"].to(device),
                pixel_values=None if pixel_values is None else pixel_values.to(device=device, dtype=dtype),
                attention_mask=inputs["attention_mask"].to(device),
                labels=inputs["labels"].to(device),
            )
        # Left padding and text that is never pooled: in the last stage's layout each sample's continuation
        # is still its last n tokens, predicted by the n positions before them.
        logprobs = torch.log_softmax(out.logits.float(), dim=-1)  # (B, L_last, V)
        for b, sample in enumerate(batch):
            target = torch.tensor([t for t in sample["labels"] if t != IGNORE_INDEX], device=logprobs.device)
            n = len(target)
            rows = logprobs[b, -n - 1 : -1]  # (n, V)
            total = float(rows.gather(-1, target[:, None]).sum())
            # The model's own per-sample loss over the same tokens: a mismatch means the layout assumption broke.
            if abs(-total / n - float(out.sample_loss[b])) > 1e-3 * max(1.0, abs(total / n)):
                raise RuntimeError(f"continuation log-probability {total / n:.6g} per token disagrees with the "
                                   f"model's loss {float(out.sample_loss[b]):.6g}")
            results.append((total, bool((rows.argmax(-1) == target).all())))
    return results


def _answer_records(out, batch: Sequence[EvalItem], tokenizer, config, *, compressor: str, benchmark: str,
                    model_id: str, answer_salt: str) -> list[dict[str, Any]]:
    """One LLaVA answer record per item of a generated batch, with the per-sample measurements."""
    from dpn.flops import flops_report

    n_new = out.num_new_tokens.cpu().tolist()
    paths = out.routing_paths.cpu().tolist()
    vis = out.visual_tokens_per_layer.cpu().tolist()
    txt = out.text_tokens_per_layer.cpu().tolist()
    records = []
    for b, item in enumerate(batch):
        text = decode_answer(out, b, tokenizer)
        report = flops_report(config, vis[b], txt[b])
        difficulty = item.extra.get("difficulty")
        metadata = {
            "benchmark": benchmark,
            "compressor": compressor,
            "category": item.category,
            "difficulty": difficulty if isinstance(difficulty, str) else None,
            "routing_experts": paths[b],
            "routing_path": path_label(paths[b], config.expert_factors),
            "visual_tokens_per_layer": vis[b],
            "text_tokens_per_layer": txt[b],
            "prefill_tflops": report["tflops"],
            "prefill_tflops_exact": report["tflops_exact"],
            "baseline_prefill_tflops": report["baseline_tflops"],
            "vision_tflops": report["vision_tflops"],
            "num_new_tokens": n_new[b],
        }
        answer_id = hashlib.sha1(f"{answer_salt}:{item.question_id!r}".encode()).hexdigest()[:22]
        records.append(answer_record(item, text, model_id=model_id, answer_id=answer_id, metadata=metadata))
    return records


__all__ = ["check_checkpoint", "continuation_logprobs", "decode_answer", "find_tokenizer_dir", "generate_batches",
           "load_model", "load_model_and_processor", "path_label", "predict"]
