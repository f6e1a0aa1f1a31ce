"""The one module that talks to MLflow: training, the pipeline DAG, evaluation and the registry gate
(`pipelines.registry`) all log through it.

Design:
- Every call goes through an explicit `MlflowClient` bound to one tracking URI: no fluent "active run",
  so driver threads (the DAG runs steps concurrently) and Ray workers never share hidden global state.
- Only one process per job logs. Inside Ray Train that is the rank-0 worker: `RunTracker.open(...,
  enabled=rank == 0)` gives the other ranks an inert tracker whose methods do nothing, so call sites
  need no `if rank == 0`.
- Runs are resumable: `open(run_id=...)` continues a run (same id, status back to RUNNING) and
  `open(run_key=...)` finds the run of a deterministic key (e.g. a training config hash) before creating
  one, so a re-started worker or driver never duplicates a run.
- Tracking URI: explicit value > $MLFLOW_TRACKING_URI > `sqlite:///<work_dir>/mlflow.db`. MLflow 3's file
  store is in maintenance mode (it raises), hence SQLite; experiments get an explicit artifact location
  under the work dir, otherwise artifacts would land in `./mlruns` of whatever the cwd is.

Nothing happens at import time: mlflow itself is imported lazily.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_PARENT_RUN_ID = "DPN_PARENT_RUN_ID"  # set by `dpn submit` for jobs that attach to a pipeline run
DEFAULT_EXPERIMENT = "dpn"
DEFAULT_WORK_DIR = ".dpn_work"
RUN_KEY_TAG = "dpn.run_key"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests child runs under it
# MLflow 3 rejects param values over 6000 characters; longer values are cut (the full config is also
# logged as a JSON artifact by callers that need it).
MAX_PARAM_LENGTH = 6000


# ----- URIs -----------------------------------------------------------------------------------------
def resolve_tracking_uri(uri: str | None = None, work_dir: str | os.PathLike | None = None) -> str:
    """The tracking URI to use: `uri` if given, else $MLFLOW_TRACKING_URI, else a SQLite store
    `sqlite:///<work_dir>/mlflow.db` (work_dir defaults to `.dpn_work`, created if missing)."""
    if uri:
        return str(uri)
    env = os.environ.get(ENV_TRACKING_URI)
    if env:
        return env
    root = Path(work_dir or DEFAULT_WORK_DIR).absolute()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def default_artifact_location(tracking_uri: str, work_dir: str | os.PathLike | None = None) -> str | None:
    """Artifact root for new experiments: `<work_dir>/mlartifacts` for a local SQLite store (work_dir
    defaults to the database's directory); None for any other store (a tracking server decides)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    if work_dir is None:
        work_dir = Path(tracking_uri[len("sqlite:///") :]).parent
    return Path(work_dir).absolute().joinpath("mlartifacts").as_uri()


def resolve_parent_run_id(parent_run_id: str | None = None) -> str | None:
    """An explicit parent run id, else $DPN_PARENT_RUN_ID (set by `dpn submit`), else None."""
    return parent_run_id or os.environ.get(ENV_PARENT_RUN_ID) or None


def client(tracking_uri: str | None = None, work_dir: str | os.PathLike | None = None):
    """An `MlflowClient` on the resolved tracking URI (also used as the registry URI)."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri, work_dir)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# MLflow 3's UI asks for an experiment's kind (GenAI or machine learning) unless this tag says it; ours is
# model training, which opens in the classic runs view.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def get_or_create_experiment(mlflow_client, name: str, artifact_location: str | None = None) -> str:
    """Id of experiment `name`, created with `artifact_location` if it does not exist (or was deleted),
    tagged `mlflow.experimentKind` = `custom_model_development` (also set on an existing one lacking it)."""
    from mlflow.exceptions import MlflowException

    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "deleted":
        mlflow_client.restore_experiment(exp.experiment_id)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:
            mlflow_client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    try:
        return mlflow_client.create_experiment(name, artifact_location=artifact_location,
                                               tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except MlflowException:
        # Another process created it between our lookup and create (concurrent pipeline steps).
        exp = mlflow_client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# ----- params ---------------------------------------------------------------------------------------
def flatten_params(obj: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a (nested) dataclass / mapping into dotted keys with string values, e.g.
    {"optim.lr": "2e-05", "model.preset": "tiny"}. Lists and tuples become JSON; None becomes "None"."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    out: dict[str, str] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if (dataclasses.is_dataclass(v) and not isinstance(v, type)) or isinstance(v, Mapping):
                out.update(flatten_params(v, key))
            else:
                out[key] = _param_value(v)
        return out
    return {prefix or "value": _param_value(obj)}


def _param_value(v: Any) -> str:
    if isinstance(v, list | tuple):
        s = json.dumps(list(v), default=str)
    elif isinstance(v, Path):
        s = str(v)
    else:
        s = str(v)
    return s if len(s) <= MAX_PARAM_LENGTH else s[: MAX_PARAM_LENGTH - 3] + "..."


# ----- runs -----------------------------------------------------------------------------------------
class RunTracker:
    """Handle on one MLflow run. An inert tracker (`enabled=False`, e.g. ranks != 0) ignores every call.

    Create one with `RunTracker.open(...)`; end it with `finish()`.
    """

    def __init__(self, mlflow_client=None, run_id: str | None = None, enabled: bool = True, resumed: bool = False):
        self.enabled = bool(enabled and mlflow_client is not None and run_id)
        self._client = mlflow_client
        self.run_id = run_id
        self.resumed = resumed  # True when open() continued an existing run
        self._system_monitor = None

    # ----- opening ------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        *,
        tracking_uri: str | None = None,
        work_dir: str | os.PathLike | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        run_name: str | None = None,
        run_id: str | None = None,
        run_key: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        enabled: bool = True,
    ) -> RunTracker:
        """Start or resume a run.

        Args:
            tracking_uri / work_dir: see `resolve_tracking_uri`.
            experiment: experiment name (created with an artifact location under work_dir if missing).
            run_name: display name of a new run.
            run_id: resume exactly this run (it must exist); its status goes back to RUNNING.
            run_key: a deterministic key (tag `dpn.run_key`): the newest non-deleted run of the experiment
                with this key (and this parent) is resumed, else a new run is created with the key.
            parent_run_id: make a new run a child of this run (tag `mlflow.parentRunId`).
            tags: set on the run (new or resumed).
            enabled: False returns an inert tracker without touching MLflow (non-zero ranks).
        Returns:
            A `RunTracker`; `.resumed` tells whether an existing run was continued.
        """
        if not enabled:
            return cls(enabled=False)
        uri = resolve_tracking_uri(tracking_uri, work_dir)
        c = client(uri)
        resumed = False
        if run_id:
            run = c.get_run(run_id)  # raises if unknown: a run id given explicitly must exist
            if run.info.lifecycle_stage == "deleted":
                c.restore_run(run_id)
            resumed = True
        else:
            exp_id = get_or_create_experiment(c, experiment, default_artifact_location(uri, work_dir))
            found = _find_by_key(c, exp_id, run_key, parent_run_id) if run_key else None
            if found is not None:
                run_id, resumed = found, True
            else:
                new_tags = dict(tags or {})
                if run_key:
                    new_tags[RUN_KEY_TAG] = run_key
                if parent_run_id:
                    new_tags[PARENT_TAG] = parent_run_id
                run_id = c.create_run(exp_id, tags=new_tags, run_name=run_name).info.run_id
        if resumed:
            c.update_run(run_id, status="RUNNING")
            if tags:
                for k, v in tags.items():
                    c.set_tag(run_id, k, str(v))
        return cls(c, run_id, enabled=True, resumed=resumed)

    @property
    def tracking_uri(self) -> str | None:
        return self._client.tracking_uri if self.enabled else None

    @property
    def artifact_uri(self) -> str | None:
        return self._client.get_run(self.run_id).info.artifact_uri if self.enabled else None

    # ----- logging ------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any] | Any) -> None:
        """Log params (a flat mapping, or a dataclass / nested mapping that is flattened first).

        Params already on the run with the same value are skipped (a resumed run re-logs its config);
        a different value raises ValueError naming the keys, since MLflow params are immutable.
        """
        if not self.enabled:
            return
        from mlflow.entities import Param

        flat = flatten_params(params) if not _is_flat_str_mapping(params) else dict(params)
        existing = self._client.get_run(self.run_id).data.params
        changed = {k: (existing[k], v) for k, v in flat.items() if k in existing and existing[k] != v}
        if changed:
            raise ValueError(
                f"run {self.run_id} already has different values for params (logged, new): {changed}; a changed "
                "config must start a new run"
            )
        new = [Param(k, v) for k, v in flat.items() if k not in existing]
        for i in range(0, len(new), 100):  # MLflow caps a batch at 100 params
            self._client.log_batch(self.run_id, params=new[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log namespaced metrics (e.g. "loss/lm", "throughput/tokens_per_s") at `step`. Non-finite or
        None values are skipped rather than poisoning the plots."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [
            Metric(str(k), float(v), ts, int(step))
            for k, v in metrics.items()
            if v is not None and math.isfinite(float(v))
        ]
        for i in range(0, len(batch), 1000):  # MLflow caps a batch at 1000 metrics
            self._client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload one local file under `artifact_path`."""
        if self.enabled:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a local directory's contents under `artifact_path`."""
        if self.enabled:
            self._client.log_artifacts(self.run_id, str(directory), artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Write `obj` as JSON to the run's artifact `artifact_file` (e.g. "config/train.json")."""
        if self.enabled:
            self._client.log_dict(self.run_id, obj, artifact_file)

    def log_model_dir(self, model_dir: str | os.PathLike, artifact_path: str = "model") -> None:
        """Log a `save_pretrained` directory (config.json + model.safetensors [+ tokenizer]) as artifacts,
        loadable again with `DPNForConditionalGeneration.from_pretrained(download_artifacts(...))`."""
        if not self.enabled:
            return
        d = Path(model_dir)
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"{d}: not a save_pretrained directory (no config.json)")
        self._client.log_artifacts(self.run_id, str(d), artifact_path)
        self.set_tags({"dpn.model_artifact": artifact_path})

    def log_dataset(
        self,
        manifest: Mapping[str, Any],
        *,
        name: str,
        source: str,
        digest: str | None = None,
        context: str = "training",
    ) -> None:
        """Record a dataset as the run's input (MLflow "Datasets used"), plus its manifest as the
        artifact `inputs/<name>.json`.

        Args:
            manifest: JSON-able description (fingerprint, shard list, row counts, ...).
            name: dataset name shown in the UI.
            source: where the data lives (a local directory or URI).
            digest: content fingerprint; defaults to manifest["fingerprint"] or a hash of the manifest.
            context: "training", "evaluation", ...
        """
        if not self.enabled:
            return
        import hashlib

        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        if digest is None:
            digest = str(manifest.get("fingerprint") or "") or hashlib.sha256(
                json.dumps(manifest, sort_keys=True, default=str).encode()
            ).hexdigest()
        dataset = MetaDataset(source=LocalArtifactDatasetSource(str(source)), name=name, digest=str(digest)[:36])
        already = {
            (d.dataset.name, d.dataset.digest) for d in self._client.get_run(self.run_id).inputs.dataset_inputs
        }
        if (dataset.name, dataset.digest) not in already:
            tag = InputTag(key="mlflow.data.context", value=context)
            self._client.log_inputs(self.run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), [tag])])
        self.log_dict(dict(manifest), f"inputs/{name}.json")

    # ----- system metrics -----------------------------------------------------------------------
    def start_system_metrics(self, interval_s: float = 10.0) -> None:
        """Sample CPU / memory / disk / network (and GPU where available) into `system/*` metrics in a
        background thread until `finish()`."""
        if not self.enabled or self._system_monitor is not None:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            self.run_id, sampling_interval=interval_s, resume_logging=self.resumed, tracking_uri=self.tracking_uri
        )
        monitor.start()
        self._system_monitor = monitor

    # ----- ending -------------------------------------------------------------------------------
    def finish(self, status: str = "FINISHED") -> None:
        """Stop system metrics and set the run's status ("FINISHED", "FAILED" or "KILLED")."""
        if not self.enabled:
            return
        if self._system_monitor is not None:
            self._system_monitor.finish()
            self._system_monitor = None
        self._client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FINISHED" if exc_type is None else "FAILED")


def _is_flat_str_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(v, str) for v in obj.values())


def _find_by_key(mlflow_client, experiment_id: str, run_key: str, parent_run_id: str | None) -> str | None:
    flt = f"tags.`{RUN_KEY_TAG}` = '{run_key}'"
    if parent_run_id:
        flt += f" and tags.`{PARENT_TAG}` = '{parent_run_id}'"
    runs = mlflow_client.search_runs([experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


# ----- reading back ---------------------------------------------------------------------------------
def get_run(run_id: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """A run as plain data: status, name, params, latest metrics, tags, artifact URI, parent id."""
    run = client(tracking_uri).get_run(run_id)
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "experiment_id": run.info.experiment_id,
        "artifact_uri": run.info.artifact_uri,
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "tags": dict(run.data.tags),
        "parent_run_id": run.data.tags.get(PARENT_TAG),
    }


def metric_history(run_id: str, key: str, tracking_uri: str | None = None) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric, sorted by step (then time)."""
    hist = client(tracking_uri).get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(hist, key=lambda m: (m.step, m.timestamp))]


def find_runs(
    experiment: str = DEFAULT_EXPERIMENT, filter_string: str = "", tracking_uri: str | None = None
) -> list[dict[str, Any]]:
    """Runs of an experiment matching an MLflow filter string, newest first (id, name, status, tags)."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = c.search_runs([exp.experiment_id], filter_string=filter_string, order_by=["attributes.start_time DESC"])
    return [
        {"run_id": r.info.run_id, "run_name": r.info.run_name, "status": r.info.status, "tags": dict(r.data.tags)}
        for r in runs
    ]


def child_runs(parent_run_id: str, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Runs whose parent is `parent_run_id`, in any experiment of the store (newest first)."""
    c = client(tracking_uri)
    parent = c.get_run(parent_run_id)
    runs = c.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
        order_by=["attributes.start_time DESC"],
    )
    return [{"run_id": r.info.run_id, "run_name": r.info.run_name, "status": r.info.status} for r in runs]


def download_artifacts(
    run_id: str, artifact_path: str, dst_dir: str | os.PathLike | None = None, tracking_uri: str | None = None
) -> Path:
    """Download a run's artifact (file or directory) into `dst_dir` (a fresh temp dir by default)."""
    dst = Path(dst_dir) if dst_dir is not None else Path(tempfile.mkdtemp(prefix="dpn-artifacts-"))
    dst.mkdir(parents=True, exist_ok=True)
    return Path(client(tracking_uri).download_artifacts(run_id, artifact_path, str(dst)))


def run_link(run_id: str, tracking_uri: str | None = None) -> str:
    """Where to open run `run_id` in the MLflow UI: its URL for a tracking server; for a local SQLite store,
    the `mlflow ui` command to start one and the run's URL on it (its default address)."""
    uri = resolve_tracking_uri(tracking_uri)
    exp_id = client(uri).get_run(run_id).info.experiment_id
    path = f"#/experiments/{exp_id}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{path}"
    return f"mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000/{path}"


def check_reachable(tracking_uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, before any work, when the tracking store cannot be reached.

    Raises ConnectionError naming the URI. A local SQLite store is created on first use and always counts
    as reachable; a server must answer its /health endpoint within `timeout_s`.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            if r.status == 200:
                return
            raise ConnectionError(f"MLflow tracking server {tracking_uri} is not reachable: /health answered {r.status}")
    except (urllib.error.URLError, OSError) as e:
        raise ConnectionError(f"MLflow tracking server {tracking_uri} is not reachable ({e}); start it or set "
                              "MLFLOW_TRACKING_URI to a reachable server") from e


# ----- the served model (MLflow pyfunc) -------------------------------------------------------------
PYFUNC_ARTIFACT = "pyfunc"  # the run artifact holding the MLflow model that the registry versions point at
HF_ARTIFACT = "hf_model"  # the artifact key of the save_pretrained directory inside that MLflow model


def log_pyfunc_model(
    run_id: str,
    model_dir: str | os.PathLike,
    *,
    python_model: Any,
    model_config: dict[str, Any],
    params: dict[str, int],
    artifact_path: str = PYFUNC_ARTIFACT,
    tracking_uri: str | None = None,
    tmp_dir: str | os.PathLike | None = None,
) -> str:
    """Log `model_dir` (a `save_pretrained` directory) as the MLflow pyfunc model `python_model`
    (`pipelines.serving.DPNPyfunc`) under the run's artifact `artifact_path`; returns that artifact's URI,
    what `register_model` versions.

    The model holds the directory as its artifact `hf_model`, the signature (input `image`: path or bytes,
    `question`: string; output `answer`; `params`, e.g. {"max_new_tokens": 16}, with their defaults) and
    `model_config` (`pipelines.serving.ServingConfig` as a dict), so
    `mlflow.pyfunc.load_model("models:/<name>@champion")` and `mlflow models serve` answer with it. It is written with `mlflow.pyfunc.save_model` and uploaded with the client: `log_model` needs
    MLflow's process-global active run, which concurrent DAG steps must not share (see the module
    docstring); the files are the same. Loading it needs this package installed (`pip install dpn`)."""
    import importlib.metadata

    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    # The model class comes from the caller (`pipelines.registry`: `pipelines.serving.DPNPyfunc`): imported
    # here, every step's code key (`pipelines.code_keys`) would cover the inference and scoring code.
    signature = ModelSignature(
        inputs=Schema([ColSpec(AnyType(), "image"), ColSpec("string", "question")]),
        outputs=Schema([ColSpec("string", "answer")]),
        params=ParamSchema([ParamSpec(name, "long", default) for name, default in params.items()]),
    )
    # Pinned to what logged it: the model's numerics depend on torch and transformers.
    requirements = [f"{pkg}=={importlib.metadata.version(pkg).split('+')[0]}"
                    for pkg in ("torch", "transformers", "mlflow", "pillow", "pandas")]
    # The weights are copied once into the MLflow model before the upload: under `tmp_dir` (a step's scratch
    # dir, which the pipeline cleans after a kill) rather than a pod's possibly small /tmp.
    with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
        local = Path(tmp) / artifact_path
        mlflow.pyfunc.save_model(
            local, python_model=python_model, artifacts={HF_ARTIFACT: str(model_dir)}, signature=signature,
            model_config=model_config, pip_requirements=requirements,
        )
        c = client(tracking_uri)
        c.log_artifacts(run_id, str(local), artifact_path)
    c.set_tag(run_id, "dpn.pyfunc_artifact", artifact_path)
    return f"{c.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"


# ----- model registry -------------------------------------------------------------------------------
def register_model(
    run_id: str,
    name: str,
    artifact_path: str = "model",
    tracking_uri: str | None = None,
    tags: Mapping[str, Any] | None = None,
    description: str | None = None,
) -> str:
    """Register the run's model directory artifact as a new version of registered model `name`
    (created if missing). Returns the version number as a string."""
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    try:
        c.get_registered_model(name)
    except MlflowException:
        try:
            c.create_registered_model(name)
        except MlflowException:  # created concurrently
            c.get_registered_model(name)
    source = f"{c.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    mv = c.create_model_version(
        name, source=source, run_id=run_id, tags={k: str(v) for k, v in (tags or {}).items()}, description=description
    )
    return str(mv.version)


def set_alias(name: str, alias: str, version: str | int, tracking_uri: str | None = None) -> None:
    """Point `alias` (`pipelines.registry.CHAMPION`, `CHALLENGER`) of registered model `name` at `version`."""
    client(tracking_uri).set_registered_model_alias(name, alias, str(version))


def get_alias(name: str, alias: str, tracking_uri: str | None = None) -> dict[str, Any] | None:
    """The version `alias` points at: {"version", "run_id", "source", "tags"}, or None if unset."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    return {"version": str(mv.version), "run_id": mv.run_id, "source": mv.source, "tags": dict(mv.tags)}


def download_model(
    name: str,
    alias: str | None = None,
    version: str | int | None = None,
    dst_dir: str | os.PathLike | None = None,
    tracking_uri: str | None = None,
) -> Path:
    """Download a registered model version (by alias or version) into `dst_dir`; returns the directory
    to pass to `DPNForConditionalGeneration.from_pretrained` (for a pyfunc version, `log_pyfunc_model`,
    the `save_pretrained` directory inside it)."""
    if (alias is None) == (version is None):
        raise ValueError(f"give exactly one of alias or version, got alias={alias!r} version={version!r}")
    c = client(tracking_uri)
    mv = c.get_model_version_by_alias(name, alias) if alias is not None else c.get_model_version(name, str(version))
    run = c.get_run(mv.run_id)
    root = run.info.artifact_uri.rstrip("/") + "/"
    if not mv.source.startswith(root):
        raise ValueError(f"model version {name}/{mv.version} has source {mv.source!r} outside its run's artifacts")
    got = download_artifacts(mv.run_id, mv.source[len(root) :], dst_dir, tracking_uri)
    if (got / "MLmodel").is_file():
        return _pyfunc_artifact_dir(got, HF_ARTIFACT)
    return got


def _pyfunc_artifact_dir(model_dir: Path, key: str) -> Path:
    """Where artifact `key` of the pyfunc model saved in `model_dir` lies (its MLmodel file says)."""
    import yaml

    flavors = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]
    artifacts = flavors.get("python_function", {}).get("artifacts", {})
    if key not in artifacts:
        raise ValueError(f"{model_dir}: the pyfunc model has no artifact {key!r} (has {sorted(artifacts)})")
    return model_dir / artifacts[key]["path"]


__all__ = [
    "check_reachable",
    "DEFAULT_EXPERIMENT",
    "RunTracker",
    "child_runs",
    "client",
    "download_artifacts",
    "download_model",
    "find_runs",
    "flatten_params",
    "get_alias",
    "get_run",
    "log_pyfunc_model",
    "metric_history",
    "HF_ARTIFACT",
    "PYFUNC_ARTIFACT",
    "register_model",
    "resolve_parent_run_id",
    "resolve_tracking_uri",
    "run_link",
    "set_alias",
]
