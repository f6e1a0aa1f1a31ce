"""The preflight of a pipeline (`dpn pipeline plan`, and `dpn pipeline run` / `dpn train` before Ray starts):
every input the steps that would run read is checked -- exists and has the right shape -- and every
problem is listed at once, so that a missing ground-truth file fails in seconds, not after hours of
training.

What is checked, for the steps `cfg.until` selects:
- the corpus paths that are set exist (`CorpusConfig.missing_paths`);
- annotations parse: their first `HEAD_RECORDS` records are read as preprocessing reads them, are JSON
  objects, and name images that exist under the image root (a wrong `image_root` shows here);
- the tokenizer holds the special tokens the recipe needs (`<image>`, and `<ROUTER>` for a dpn variant:
  `dpn.tokenizer.check_prepared`);
- given shards open (`pipelines.data.loader.open_shards`);
- every benchmark's folder, question file and ground truth is there (`locate_benchmark`);
- the training recipe's weights: placeholders ("<vicuna>") are set, model / LLM / vision directories hold a
  config.json and weights, a projector path holds a projector.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.recipes import STAGE0_OUTPUT, STAGE1_OUTPUT, TrainConfig

if TYPE_CHECKING:
    from pipelines.workflow import PipelineConfig

HEAD_RECORDS = 50
_PROJECTOR_FILES = ("multi_modal_projector.safetensors", "mm_projector.bin", "mm_projector.safetensors")


def _annotation_problems(field: str, path: str, image_root: str | None) -> list[str]:
    from pipelines.data.annotations import peek_records
    from pipelines.data.records import RecordError, resolve_image_path

    try:
        head = peek_records(path, HEAD_RECORDS)
    except (OSError, ValueError) as e:
        return [f"corpus.{field}: {e}"]
    if not head:
        return [f"corpus.{field}: {path} holds no record"]
    problems = []
    objects = [r for r in head if isinstance(r, dict)]
    if not objects:
        problems.append(f"corpus.{field}: none of the first {len(head)} records of {path} is a JSON object "
                        "(LLaVA records: {id, image, conversations})")
    images = [r["image"] for r in objects if isinstance(r.get("image"), str) and r["image"]]
    if images and image_root and Path(image_root).is_dir():
        found = 0
        for rel in images:
            try:
                found += resolve_image_path(Path(image_root), rel).is_file()
            except RecordError:
                pass
        if not found:
            problems.append(f"corpus.image_root: none of the {len(images)} images named by the first records of "
                            f"{path} exists under {image_root} (e.g. {images[0]!r}); is image_root right?")
    return problems


def _weights_problems(name: str, value: str | None, kind: str) -> list[str]:
    """`kind`: "checkpoint" (config.json + weights), "projector" (a projector file or a directory holding one)."""
    if not value or value in (STAGE0_OUTPUT, STAGE1_OUTPUT):  # produced by the pipeline's own steps
        return []
    if value.startswith("<") and value.endswith(">"):
        return [f"train_overrides.{name}: not set (the recipe's placeholder {value!r}): give a local path, e.g. "
                f"train_overrides: {{{name}: /path}}"]
    p = Path(value)
    if kind == "projector":
        if p.is_file() or (p.is_dir() and any((p / f).is_file() for f in _PROJECTOR_FILES)):
            return []
        return [f"train_overrides.{name}: {value!r} is neither a projector file nor a directory holding one of "
                f"{list(_PROJECTOR_FILES)}"]
    if not p.is_dir():
        return [f"train_overrides.{name}: directory {value!r} does not exist"]
    problems = []
    if not (p / "config.json").is_file():
        problems.append(f"train_overrides.{name}: {value!r} holds no config.json")
    from dpn.loading import weight_files  # what loading will read: an index naming a missing shard counts

    try:
        weight_files(p)
    except (FileNotFoundError, ValueError) as e:
        problems.append(f"train_overrides.{name}: {value!r} holds no weights ({e})")
    return problems


def _stage_problems(stage: TrainConfig) -> list[str]:
    m = stage.model
    problems = []
    for name, value in (("model.path", m.path), ("model.llm_path", m.llm_path), ("model.vision_path", m.vision_path)):
        problems += _weights_problems(name, value, "checkpoint")
    if stage.stage == 2 or (m.projector_path and m.projector_path != STAGE1_OUTPUT):
        problems += _weights_problems("model.projector_path", m.projector_path, "projector")
    return problems


def preflight(cfg: PipelineConfig, steps: Iterable[str]) -> list[str]:
    """Every problem with the inputs of `steps` (the names of the steps `cfg`'s DAG runs: the caller has
    built it, and this module must not import the workflow that imports it) -- empty: ready -- one line each."""
    from dpn.tokenizer import check_prepared
    from pipelines.evaluation.benchmarks import locate_benchmark

    steps = set(steps)
    corpus = cfg.corpus
    problems = corpus.missing_paths()
    if not corpus.synthetic:
        reads = {"preprocess_pretrain": "pretrain", "preprocess_instruct": "instruct",
                 "preprocess_instruct_router": "instruct", "preprocess_calibration": "calibration"}
        checked = set()
        for step, split in reads.items():
            if step not in steps or (split in ("pretrain", "instruct") and getattr(corpus, f"{split}_shards")):
                continue
            field = "calibration_annotations" if split == "calibration" and corpus.calibration_annotations else (
                "instruct_annotations" if split == "calibration" else f"{split}_annotations")
            path = getattr(corpus, field)
            if path and path not in checked and Path(path).is_file():
                checked.add(path)
                problems += _annotation_problems(field, path, corpus.image_root)
        for split in ("pretrain", "instruct"):
            shards = getattr(corpus, f"{split}_shards")
            if shards and Path(shards).is_dir():
                from pipelines.data.loader import open_shards

                try:
                    open_shards(shards)
                except (OSError, ValueError) as e:
                    problems.append(f"corpus.{split}_shards: {e}")
        if corpus.tokenizer and Path(corpus.tokenizer).is_dir():
            router = any(s in steps for s in ("preprocess_instruct_router", "preprocess_calibration"))
            problems += [f"corpus.tokenizer: {p}" for p in check_prepared(corpus.tokenizer, router_token=router)]
        if "evaluate" in steps and corpus.eval_root and Path(corpus.eval_root).is_dir():
            for name in cfg.benchmarks:
                try:
                    locate_benchmark(name, corpus.eval_root)
                except FileNotFoundError as e:
                    problems.append(f"corpus.eval_root: {e}")
    stages = [1] if cfg.until == "stage1" else [1, 2]
    for stage in stages:
        problems += _stage_problems(cfg.stage_config(stage))
    # One line each (a library's message may span several).
    return list(dict.fromkeys(" ".join(p.split()) for p in problems))


__all__ = ["HEAD_RECORDS", "preflight"]
