"""Real parts: a Ray head started with `ray start --head` on loopback and a real `mlflow server`
(SQLite; PostgreSQL from Debian's packages behind the `postgres` marker, which .ci/run sets up); the
pipeline is submitted as a Ray job with `dpn submit`, and the test checks the job succeeded and that the
runs, metrics, artifacts and registered model are in that server. Every process started here is stopped
by process group."""

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
SMALL = """
corpus: {n_pretrain: 64, n_instruct: 64, n_eval: 15}
variants: [dpn, none]
train_overrides: {optim.max_steps: 2, optim.global_batch_size: 16, vision_pretrain.steps: 3,
                  vision_pretrain.batch_size: 4, vision_pretrain.eval_images: 4, llm_pretrain.steps: 3,
                  llm_pretrain.bare_steps: 1, llm_pretrain.eval_questions: 5}
"""


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
def ray_head(tmp: Path):
    port, dash = free_port(), free_port()
    # Ray's unix sockets live under --temp-dir and their paths must stay under 108 bytes: keep it short.
    ray_tmp = tempfile.mkdtemp(prefix="dpnray", dir="/tmp")
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2",
           "--temp-dir", ray_tmp,
           # Every fixed default port (the agent's 52365 above all) may be taken by another Ray on this
           # machine (e.g. a concurrently running test's local cluster): use free ones.
           "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
           "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
           "--ray-client-server-port", str(free_port())]
    address = f"http://127.0.0.1:{dash}"
    try:
        with process(cmd, tmp / "ray.log", base_env(), lambda: http_ok(f"{address}/api/version"), 180):
            yield address
    finally:
        if not os.environ.get("DPN_KEEP_RAY_TMP"):
            shutil.rmtree(ray_tmp, ignore_errors=True)


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


def submit_and_check(tmp: Path, tracking_uri: str) -> None:
    from pipelines import registry, tracking

    cfg = tmp / "pipeline.yaml"
    cfg.write_text(SMALL)
    work = tmp / "work"
    with ray_head(tmp) as address:
        out = subprocess.run(
            [str(BIN / "dpn"), "submit", "--address", address, "--mlflow-uri", tracking_uri, "--follow",
             "--timeout", "1200", "--", "dpn", "pipeline", "run", "--config", str(cfg), "--work-dir", str(work)],
            cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=1300)
        assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
        assert "SUCCEEDED" in out.stderr
    summary = __import__("json").loads(
        [line for line in out.stdout.splitlines() if line.startswith('{"status"')][-1])
    assert summary["tracking_uri"] == tracking_uri
    parent = tracking.get_run(summary["parent_run_id"], tracking_uri=tracking_uri)
    assert parent["tags"]["dpn.trigger"] == "manual" and parent["status"] == "FINISHED"
    steps = {c["run_name"]: c for c in tracking.child_runs(summary["parent_run_id"], tracking_uri=tracking_uri)}
    assert {"synth", "stage0_vision", "stage0_llm", "stage1", "stage2_dpn", "stage2_none", "route_calibrate",
            "evaluate", "register"} <= set(steps)
    assert tracking.metric_history(steps["stage2_dpn"]["run_id"], "loss/lm", tracking_uri=tracking_uri)
    model = tracking.download_artifacts(steps["stage2_dpn"]["run_id"], "model", tmp / "dl", tracking_uri=tracking_uri)
    assert (model / "model.safetensors").is_file() and (model / "config.json").is_file()
    champion = tracking.get_alias("dpn", registry.CHAMPION, tracking_uri=tracking_uri)
    # The dpn variant is registered as calibrated: the model logged by the route_calibrate step's run.
    assert champion is not None and champion["run_id"] == steps["route_calibrate"]["run_id"]


# The SQLite-backed server is covered by test_cluster_auth's two-node pipeline test (same submission, same
# MLflow checks); running a third full pipeline for it cost CI ~5 minutes of its 20.
@pytest.mark.slow
@pytest.mark.postgres
def test_pipeline_as_ray_job_against_mlflow_server_postgres(tmp_path):
    if not os.environ.get("DPN_TEST_POSTGRES"):
        pytest.skip("set DPN_TEST_POSTGRES=1 (.ci/run does) to run against a local PostgreSQL")
    with postgres(tmp_path) as pg, mlflow_server(tmp_path, pg) as uri:
        submit_and_check(tmp_path, uri)
