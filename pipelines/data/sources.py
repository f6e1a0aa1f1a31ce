"""The pipeline's data sources (`CorpusConfig`): the embedded synthetic corpus (the `synth` step), or LLaVA
annotation files / preprocessed shards on disk; and where a step finds each split (`corpus_paths`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import Field, with_config

from pipelines.validation import STRICT, ConfigError, check_fields


@with_config(STRICT)
@dataclass(kw_only=True)
class CorpusConfig:
    """Where the data comes from: the synthetic corpus, or LLaVA annotations / preprocessed shards on disk.

    Args:
        synthetic: generate the embedded synthetic corpus (`dpn synth`) instead of reading real corpora.
        seed / n_pretrain / n_instruct / n_eval: synthetic corpus size and seed.
        n_calibration: synthetic held-out records the routers are fitted and the budget calibrated on.
        pretrain_annotations / instruct_annotations: LLaVA JSON files (LCS-558K, mix665K) when not synthetic.
        pretrain_shards / instruct_shards: shards `dpn preprocess` wrote, used as they are instead of the
            annotations (`dpn train --set data.shards=...`).
        image_root: directory the annotations' `image` paths are relative to.
        tokenizer: tokenizer directory (the LLM's, with `<image>`/`<ROUTER>` added) when not synthetic.
        eval_root: directory holding the benchmarks' question files (LLaVA eval layout).
        calibration_annotations: held-out LLaVA JSON (mix665K schema) for the routers, when not synthetic;
            None: the instruct annotations themselves (samples the model trained on: the budget still
            transfers, the counterfactual targets are then measured on seen samples).
        follow_symlinks_outside_root: read images through symlinks leading outside image_root (e.g.
            `coco -> /data/coco`); otherwise such records are quarantined (image_outside_root).
    Which paths are required depends on the steps that run (a pipeline up to stage 1 reads no instruct
    data): `require` is asked by every step that reads the corpus. Whether they exist is checked before a
    run starts (`missing_paths`, and the preflight of `pipelines.workflow`), not when the config is built,
    so that `dpn pipeline status` works whatever the disk holds.
    """

    synthetic: bool = True
    seed: Annotated[int, Field(ge=0)] = 0
    n_pretrain: Annotated[int, Field(ge=1)] = 2000
    n_instruct: Annotated[int, Field(ge=1)] = 2000
    n_eval: Annotated[int, Field(ge=1)] = 300
    n_calibration: Annotated[int, Field(ge=0)] = 256
    pretrain_annotations: str | None = None
    instruct_annotations: str | None = None
    pretrain_shards: str | None = None
    instruct_shards: str | None = None
    image_root: str | None = None
    tokenizer: str | None = None
    eval_root: str | None = None
    calibration_annotations: str | None = None
    follow_symlinks_outside_root: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "corpus")
        if self.synthetic:
            given = [n for n in ("pretrain_shards", "instruct_shards") if getattr(self, n)]
            if given:
                raise ConfigError([f"corpus.{n}: is read only with corpus.synthetic: false" for n in given])

    def missing_paths(self) -> list[str]:
        """One line per set path that does not exist (or is a file where a directory is expected, or the
        reverse); the synthetic corpus reads none of them."""
        files = ("pretrain_annotations", "instruct_annotations", "calibration_annotations")
        dirs = ("pretrain_shards", "instruct_shards", "image_root", "tokenizer", "eval_root")
        problems = []
        for name in files + dirs:
            value = getattr(self, name)
            if value is None or (self.synthetic and name != "calibration_annotations"):
                continue
            if name in files and not Path(value).is_file():
                problems.append(f"corpus.{name}: {value!r} is not a file")
            if name in dirs and not Path(value).is_dir():
                problems.append(f"corpus.{name}: {value!r} is not a directory")
        return problems

    def require(self, split: str) -> None:
        """Raise ValueError naming the corpus field(s) a step reading `split` ("pretrain", "instruct",
        "calibration", "eval", "tokenizer") needs and that are not set; the synthetic corpus has them all."""
        if self.synthetic:
            return
        needs = {"eval": ["eval_root"], "tokenizer": ["tokenizer"]}.get(split)
        if needs is None:
            source = f"{split}_annotations"
            if split == "calibration":
                source = "calibration_annotations" if self.calibration_annotations else "instruct_annotations"
            elif getattr(self, f"{split}_shards"):
                source = f"{split}_shards"
            needs = [source, "tokenizer"] + ([] if source.endswith("_shards") else ["image_root"])
        for name in needs:
            if not getattr(self, name):
                alt = f" (or give corpus.{split}_shards)" if split in ("pretrain", "instruct") else ""
                raise ValueError(f"corpus.{name} is required when corpus.synthetic is false{alt}")


def corpus_paths(corpus: CorpusConfig, synth_dir: Path | None) -> dict[str, Path | None]:
    """Annotations per split, image root, tokenizer and eval root: in the synth step's output `synth_dir`
    for the synthetic corpus, else the configured paths (None where not set)."""
    if corpus.synthetic:
        if synth_dir is None:
            raise ValueError("the synthetic corpus is read from the synth step's output; none was given")
        root = synth_dir
        return {"pretrain": root / "pretrain.json", "instruct": root / "instruct.json", "images": root / "images",
                "tokenizer": root / "tokenizer", "eval": root / "eval", "calibration": root / "calibration.json"}

    def path(value: str | None) -> Path | None:
        return Path(value) if value else None

    return {"pretrain": path(corpus.pretrain_annotations), "instruct": path(corpus.instruct_annotations),
            "images": path(corpus.image_root), "tokenizer": path(corpus.tokenizer), "eval": path(corpus.eval_root),
            "calibration": path(corpus.calibration_annotations or corpus.instruct_annotations)}
