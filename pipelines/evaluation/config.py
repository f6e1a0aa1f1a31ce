"""What an evaluation runs: the models (`EvalTarget`: a checkpoint and its compressors), the benchmarks, and
how the work is cut and placed (`EvalConfig`). Validated when built, before Ray starts."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from dpn.compressors import COMPRESSORS
from dpn.eval.benchmarks import BENCHMARKS
from dpn.inference import DTYPES as INFERENCE_DTYPES
from pipelines.recipes import check_names

DTYPES = ("auto", *INFERENCE_DTYPES)  # "auto": bfloat16 on GPU, float32 on CPU
DEVICES = ("auto", "gpu", "cpu")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ----- configuration -----------------------------------------------------------------------------------
@dataclass(kw_only=True)
class EvalTarget:
    """One model checkpoint and the compressors to evaluate it with."""

    name: str
    """Display name: output folder, MLflow run name, answer files' `model_id` ([A-Za-z0-9._-])."""
    model_dir: str
    """`save_pretrained` directory of a `DPNForConditionalGeneration`."""
    compressors: list[str] | None = None
    """Compressors to run the checkpoint with (`config.compressor` is overridden at load); None = the one
    it was saved with. `dpn` needs router weights in the checkpoint."""
    tokenizer_dir: str | None = None
    """Tokenizer directory; None = `model_dir` when it holds tokenizer files, else `model_dir/tokenizer`."""
    budget: float | None = None
    """Compressor dpn: target mean LLM prefill FLOPs as a fraction of the uncompressed model, reached by
    the checkpoint's calibrated budget curve (`dpn.routing`); None = the budget it was saved with."""

    def __post_init__(self) -> None:
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int | float)
                                        or not math.isfinite(self.budget) or not 0 < self.budget <= 1):
            raise ValueError(f"target {self.name!r}: budget must be a fraction in (0, 1], got {self.budget!r}")
        if not isinstance(self.name, str) or not _SAFE_NAME.match(self.name):
            raise ValueError(f"target name must match {_SAFE_NAME.pattern} (it names folders), got {self.name!r}")
        if self.compressors is not None:
            self.compressors = check_names(f"target {self.name!r}: compressors", self.compressors, COMPRESSORS,
                                           "compressor")


@dataclass(kw_only=True)
class EvalConfig:
    """An evaluation: targets x compressors x benchmarks."""

    targets: list[EvalTarget]
    """Models to evaluate (distinct names)."""
    benchmarks: list[str]
    """Benchmark names of `dpn.eval.benchmarks.BENCHMARKS`."""
    data_root: str
    """LLaVA's `playground/data/eval` (or `dpn synth`'s `DIR/eval`); layout in `BENCHMARK_FILES`."""
    out_dir: str
    """Where shards, predictions, metrics, figures and summary.json go (shards survive for resume)."""
    limit: int | None = None
    """Evaluate only the first N questions of each benchmark (None = all)."""
    template: str = "vicuna_v1"
    """Conversation template of the prompts (LLaVA-1.5's eval scripts use vicuna_v1)."""
    batch_size: int = 8
    """Prompts per generate call (left padded, greedy)."""
    shard_size: int = 128
    """Questions per shard (the unit of scheduling, retry and resume)."""
    max_new_tokens: int = 16
    """Generation cap: every supported benchmark asks for a word, a number, yes/no or a letter."""
    dtype: str = "auto"
    """Model dtype: "auto" = bfloat16 on GPU, float32 on CPU."""
    device: str = "auto"
    """"auto": one GPU per worker when the Ray cluster has GPUs, else CPU workers; "gpu" / "cpu" force it."""
    num_workers: int | None = None
    """Actors to start; None = one per GPU, or cluster CPUs // cpus_per_worker on CPU (capped by the shards)."""
    cpus_per_worker: float = 1.0
    """`num_cpus` of each actor (and its torch threads on CPU)."""
    max_attempts: int = 3
    """Attempts per shard (application errors and worker deaths alike) before it is reported failed."""
    inject_failures: dict[str, int] = field(default_factory=dict)
    """TESTING SEAM, empty in real runs: {shard key: n} makes the first n attempts of that shard raise
    `InjectedShardFailure` inside the worker before any model work. Keys are
    "<model>/<compressor>/<benchmark>/<index>" as `plan_shards` and the summary list them."""

    def __post_init__(self) -> None:
        self.targets = [EvalTarget(**t) if isinstance(t, Mapping) else t for t in self.targets]
        if not self.targets:
            raise ValueError("targets must name at least one model")
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"target names must be distinct, got {names}")
        self.benchmarks = check_names("benchmarks", self.benchmarks, sorted(BENCHMARKS), "benchmark")
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit < 1):
            raise ValueError(f"limit must be >= 1 or None, got {self.limit!r}")
        for name in ("batch_size", "shard_size", "max_new_tokens", "max_attempts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.num_workers is not None and (isinstance(self.num_workers, bool) or self.num_workers < 1):
            raise ValueError(f"num_workers must be >= 1 or None, got {self.num_workers!r}")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        for key, n in self.inject_failures.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"inject_failures[{key!r}] must be an int >= 0, got {n!r}")
