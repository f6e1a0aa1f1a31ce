"""Real servers for the end-to-end tests: processes started by process group and stopped the same way
(`process`), a real `mlflow server` (`mlflow_server`) and a throw-away PostgreSQL (`postgres`, Debian's
binaries; marker `postgres`, which .ci/run sets up). The pipeline submitted as a Ray job to a token-
protected two-node cluster against an MLflow server is `tests/test_cluster_auth.py`; here the PostgreSQL
backend gets what a pipeline run asks of its store."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(k, None)
    env.update({"PATH": f"{BIN}:{env.get('PATH', '')}", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}, **extra)
    return env


@contextmanager
def process(cmd: list[str], log: Path, env: dict[str, str], ready, timeout: float = 120.0):
    """Start `cmd` in its own process group, wait for `ready()`, and kill the group afterwards."""
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT)
    try:
        deadline = time.time() + timeout
        while not ready():
            if p.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {p.returncode}:\n{log.read_text()[-3000:]}")
            if time.time() > deadline:
                raise TimeoutError(f"{cmd[0]} not ready after {timeout}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield p
    finally:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextmanager
def mlflow_server(tmp: Path, backend_uri: str):
    port = free_port()
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", backend_uri, "--artifacts-destination", (tmp / "artifacts").as_uri()]
    with process(cmd, tmp / "mlflow.log", base_env(), lambda: http_ok(f"http://127.0.0.1:{port}/health"), 180):
        yield f"http://127.0.0.1:{port}"


@contextmanager
def postgres(tmp: Path):
    """A throw-away PostgreSQL cluster on a loopback port (Debian's binaries; run as `postgres` when root)."""
    bindir = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)
    assert bindir is not None, "PostgreSQL is not installed: .ci/run installs Debian's postgresql"
    # Not under pytest's tmp_path: the `postgres` user cannot traverse root's 0700 pytest directories.
    tmp = Path(tempfile.mkdtemp(prefix="dpnpg", dir="/tmp"))
    data = tmp / "pgdata"
    data.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(tmp, "postgres")
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run(as_user + [str(bindir / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust"],
                   check=True, capture_output=True)
    port = free_port()
    cmd = as_user + [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1", "-k", str(tmp)]
    ready = lambda: subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],  # noqa: E731
                                   capture_output=True).returncode == 0
    try:
        with process(cmd, tmp / "postgres.log", base_env(), ready, 60):
            subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"],
                           check=True, capture_output=True)
            yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tracking_roundtrip(uri: str, model_dir: Path, tmp: Path) -> None:
    """What a pipeline run asks of its MLflow store, against `uri`: a parent run and child runs written
    concurrently (DAG steps run side by side), resumed by their key without duplicates, metric histories
    with steps, the registry gate (pyfunc model, version, aliases) and the champion's download."""
    from concurrent.futures import ThreadPoolExecutor

    from pipelines import registry, tracking

    parent = tracking.RunTracker.open(tracking_uri=uri, run_name="pipeline", run_key="pg:pipeline",
                                      tags={"dpn.trigger": "manual"})

    def step(i: int) -> str:
        run = tracking.RunTracker.open(tracking_uri=uri, parent_run_id=parent.run_id, run_name=f"step{i}",
                                       run_key=f"pg:step{i}")
        for k in range(20):
            run.log_metrics({"loss/lm": 1.0 / (k + 1), "throughput/samples_per_s": float(i)}, step=k)
        run.finish()
        return run.run_id

    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(step, range(4)))
    again = tracking.RunTracker.open(tracking_uri=uri, parent_run_id=parent.run_id, run_name="step0",
                                     run_key="pg:step0")
    assert again.run_id == ids[0], "a resumed step finds its run by key"
    again.finish()
    children = tracking.child_runs(parent.run_id, tracking_uri=uri)
    assert sorted(c["run_name"] for c in children) == [f"step{i}" for i in range(4)]
    assert len(tracking.metric_history(ids[2], "loss/lm", tracking_uri=uri)) == 20
    gate = registry.register_and_gate(ids[3], "dpn", {"score": 60.0, "tflops": 1e-4}, gate_metric="synthetic/accuracy",
                                      compressor="dpn", tracking_uri=uri, model_dir=str(model_dir), tmp_dir=str(tmp))
    assert gate["promoted"] and gate["version"] == "1"
    champion = tracking.get_alias("dpn", registry.CHAMPION, tracking_uri=uri)
    assert champion is not None and champion["run_id"] == ids[3]
    hf = tracking.download_model("dpn", alias=registry.CHAMPION, dst_dir=tmp / "dl", tracking_uri=uri)
    assert (hf / "model.safetensors").is_file() and (hf / "config.json").is_file()
    parent.finish()
    assert tracking.get_run(parent.run_id, tracking_uri=uri)["status"] == "FINISHED"


# The whole pipeline as a Ray job against an MLflow server (SQLite-backed) is test_cluster_auth's two-node
# test; a second full pipeline here for PostgreSQL cost CI ~4 of its 20 minutes, for a backend that sees the
# same calls as this round trip makes.
@pytest.mark.slow
@pytest.mark.postgres
def test_mlflow_server_on_postgres_keeps_what_a_pipeline_run_writes(tmp_path, assets):
    if not os.environ.get("DPN_TEST_POSTGRES"):
        pytest.skip("set DPN_TEST_POSTGRES=1 (.ci/run does) to run against a local PostgreSQL")
    with postgres(tmp_path) as pg, mlflow_server(tmp_path, pg) as uri:
        tracking_roundtrip(uri, assets["model"], tmp_path)
