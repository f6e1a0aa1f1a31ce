"""A real two-node Ray cluster with token auth and an MLflow server with basic auth, configured like the
Kubernetes manifests (infra/k8s), everything on 127.0.0.1:

- head: `ray start --head` with RAY_AUTH_MODE=token and a token, 3 CPUs + custom resource `dpn_test_head`;
  worker: a second `ray start --address ...` with its own 3 CPUs + `dpn_test_worker` (so the two nodes
  are told apart by their resources, and a 2-worker training stage with 2 CPUs per worker cannot fit
  on one node);
- MLflow: `mlflow server` with the args of the manifests' Deployment (`--app-name=basic-auth`,
  `--serve-artifacts`), the auth config of the manifests' ConfigMap, its secret key and admin password
  from the environment, and the pipeline's user created through the REST call infra/README.md gives.

The tests: the job API refuses requests without or with a wrong token and `dpn submit` says how to get
one; a failed job is reported, not re-run, unless `--resubmit`; logs are streamed with Ray's log tail;
and the pipeline submitted with `dpn submit` trains on both nodes, evaluates on both, and logs everything
to MLflow as the pipeline's user. Every process started here is stopped by process group."""

from __future__ import annotations

import base64
import configparser
import io
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest
from infra_manifests import render
from test_cluster import BIN, ROOT, base_env, free_port, http_ok, process

pytestmark = pytest.mark.slow

TOKEN = secrets.token_hex(32)
PIPELINE_USER = "dpn-pipeline"
PIPELINE = """
corpus: {n_pretrain: 64, n_instruct: 64, n_eval: 15}
variants: [dpn, none]
# 2 training workers of 2 CPUs each on nodes of 3 CPUs: every training stage has one worker on each node
# (and leaves a CPU per node to Ray Data).
train_overrides: {optim.max_steps: 2, optim.global_batch_size: 16, vision_pretrain.steps: 3,
                  vision_pretrain.batch_size: 4, vision_pretrain.eval_images: 4, llm_pretrain.steps: 3,
                  llm_pretrain.bare_steps: 1, llm_pretrain.eval_questions: 5,
                  scaling.num_workers: 2, scaling.cpus_per_worker: 2.0}
"""


def request(url: str, token: str | None = None, method: str = "GET", data: dict | None = None,
            basic: tuple[str, str] | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if basic is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
    body = json.dumps(data).encode() if data is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers, method=method), timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:  # not listening (yet)
        return 0, str(e)


def manifest_mlflow() -> tuple[list[str], dict[str, str], str]:
    """The MLflow Deployment's args and plain env values, and its auth config file, as rendered."""
    docs = render("production")
    deploy = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    c = deploy["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("mlflow-auth-config"))
    return c["args"], env, config["data"]["basic_auth.ini"]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow")
    args, plain_env, ini = manifest_mlflow()
    # The manifests' auth config, with the PostgreSQL database swapped for a local SQLite file.
    cfg = configparser.ConfigParser()
    cfg.read_string(ini)
    assert cfg["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    cfg["mlflow"]["database_uri"] = f"sqlite:///{tmp / 'auth.db'}"
    with open(tmp / "basic_auth.ini", "w") as f:
        cfg.write(f)
    port = free_port()
    swap = {"--host": "127.0.0.1", "--port": str(port), "--workers": "1",
            "--backend-store-uri": f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination": (tmp / "art").as_uri()}
    server_args = [f"{a.split('=')[0]}={swap[a.split('=')[0]]}" if a.split("=")[0] in swap else a for a in args]
    assert "--app-name=basic-auth" in server_args and "--serve-artifacts" in server_args
    admin = (plain_env["MLFLOW_AUTH_ADMIN_USERNAME"], secrets.token_hex(12))
    env = base_env(MLFLOW_AUTH_CONFIG_PATH=str(tmp / "basic_auth.ini"),
                   MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(32),
                   MLFLOW_AUTH_ADMIN_USERNAME=admin[0], MLFLOW_AUTH_ADMIN_PASSWORD=admin[1])
    uri = f"http://127.0.0.1:{port}"
    with process([str(BIN / "mlflow"), "server", *server_args], tmp / "mlflow.log", env,
                 lambda: http_ok(f"{uri}/health"), 180):
        pipeline = (PIPELINE_USER, secrets.token_hex(12))
        # infra/README.md, section 5: the admin creates the pipeline's user.
        status, body = request(f"{uri}/api/2.0/mlflow/users/create", method="POST", basic=admin,
                               data={"username": pipeline[0], "password": pipeline[1]})
        assert status == 200, body
        yield {"uri": uri, "admin": admin, "pipeline": pipeline, "log": tmp / "mlflow.log"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, mlflow_server):
    """Head + worker node with token auth; the Ray pods' MLflow credentials in their environment."""
    tmp = tmp_path_factory.mktemp("ray")
    # Each node its own temp dir (unix socket paths must stay short), as on two machines: nodes sharing one
    # would also share the unpacked job working dirs, which each node's runtime-env agent deletes on its own.
    ray_tmp = tempfile.mkdtemp(prefix="dpnray", dir="/tmp")
    worker_tmp = tempfile.mkdtemp(prefix="dpnrw", dir="/tmp")
    user, password = mlflow_server["pipeline"]
    env = base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, MLFLOW_TRACKING_USERNAME=user,
                   MLFLOW_TRACKING_PASSWORD=password,
                   # Evaluation actors go to the least-loaded node instead of filling the driver's node
                   # first (what GPUs do by themselves on a GPU cluster: one actor per GPU).
                   RAY_scheduler_spread_threshold="0")
    gcs, dash = free_port(), free_port()
    address = f"http://127.0.0.1:{dash}"

    def ports(*names: str) -> list[str]:
        return [a for n in names for a in (f"--{n}", str(free_port()))]

    agent_ports = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                   "metrics-export-port")
    head = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "3",
            "--resources", '{"dpn_test_head": 1}', "--temp-dir", ray_tmp,
            *ports(*agent_ports, "ray-client-server-port")]
    worker = [str(BIN / "ray"), "start", "--address", f"127.0.0.1:{gcs}", "--block", "--node-ip-address", "127.0.0.1",
              "--num-cpus", "3", "--resources", '{"dpn_test_worker": 1}', "--temp-dir", worker_tmp, *ports(*agent_ports)]

    def nodes() -> dict[str, str]:
        status, body = request(f"{address}/api/v0/nodes?limit=100&detail=1", TOKEN)
        if status != 200:
            return {}
        rows = json.loads(body)["data"]["result"]["result"]
        return {("head" if r["resources_total"].get("dpn_test_head") else "worker"): r["node_id"]
                for r in rows if r["state"] == "ALIVE"}

    try:
        with process(head, tmp / "head.log", env, lambda: request(f"{address}/api/version", TOKEN)[0] == 200, 180):
            with process(worker, tmp / "worker.log", env, lambda: len(nodes()) == 2, 180):
                yield {"address": address, "gcs": f"127.0.0.1:{gcs}", "nodes": nodes(), "env": env, "tmp": tmp}
    finally:
        if not os.environ.get("DPN_KEEP_RAY_TMP"):
            shutil.rmtree(ray_tmp, ignore_errors=True)
            shutil.rmtree(worker_tmp, ignore_errors=True)


def dpn_submit(cluster, *args: str, token: str | None = TOKEN, timeout: float = 600) -> subprocess.CompletedProcess:
    """`dpn submit` as a user runs it: a clean HOME (no ~/.ray/auth_token), the token in RAY_AUTH_TOKEN."""
    env = base_env(HOME=str(cluster["tmp"]))
    env.pop("RAY_AUTH_MODE", None)
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    return subprocess.run([str(BIN / "dpn"), "submit", "--address", cluster["address"], *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def jobs(cluster) -> dict[str, dict]:
    status, body = request(f"{cluster['address']}/api/jobs/", TOKEN)
    assert status == 200, body
    return {j["submission_id"]: j for j in json.loads(body) if j.get("submission_id")}


def permission(uri: str, admin: tuple[str, str], username: str, experiment_id: str) -> str:
    status, body = request(f"{uri}/api/3.0/mlflow/users/permissions/get?username={username}"
                           f"&resource_type=experiment&resource_id={experiment_id}", basic=admin)
    assert status == 200, body
    return json.loads(body)["permission"]


# ----- MLflow basic auth as configured by the manifests -----------------------------------------------
def test_mlflow_admits_users_by_their_grants_as_the_readme_says(mlflow_server):
    uri, admin, pipeline = mlflow_server["uri"], mlflow_server["admin"], mlflow_server["pipeline"]
    api = f"{uri}/api/2.0/mlflow"
    assert request(f"{api}/experiments/search", method="POST", data={"max_results": 5})[0] == 401
    assert request(f"{api}/experiments/search", method="POST", data={"max_results": 5},
                   basic=(pipeline[0], "wrong"))[0] == 401
    status, body = request(f"{api}/experiments/create", method="POST", basic=pipeline,
                           data={"name": f"readme-{secrets.token_hex(3)}"})
    assert status == 200, body
    exp = json.loads(body)["experiment_id"]
    assert permission(uri, admin, PIPELINE_USER, exp) == "MANAGE"
    # A colleague (infra/README.md, section 5): nothing until granted (default_permission NO_PERMISSIONS),
    # then READ: may look, may not write.
    alice = ("alice", secrets.token_hex(8))
    assert request(f"{api}/users/create", method="POST", basic=admin,
                   data={"username": alice[0], "password": alice[1]})[0] == 200
    assert request(f"{api}/experiments/get?experiment_id={exp}", basic=alice)[0] == 403
    status, body = request(f"{uri}/api/3.0/mlflow/users/permissions/grant", method="POST", basic=admin,
                           data={"username": "alice", "resource_type": "experiment", "resource_id": exp,
                                 "permission": "READ"})
    assert status == 200, body
    assert request(f"{api}/experiments/get?experiment_id={exp}", basic=alice)[0] == 200
    assert request(f"{api}/runs/create", method="POST", basic=alice, data={"experiment_id": exp})[0] == 403
    assert request(f"{api}/runs/create", method="POST", basic=pipeline, data={"experiment_id": exp})[0] == 200
    # Password rotation (section 8): the old password stops working at once.
    new = secrets.token_hex(8)
    assert request(f"{api}/users/update-password", method="PATCH", basic=admin,
                   data={"username": "alice", "password": new})[0] == 200
    assert request(f"{api}/experiments/get?experiment_id={exp}", basic=alice)[0] == 401
    assert request(f"{api}/experiments/get?experiment_id={exp}", basic=("alice", new))[0] == 200


# ----- token auth ----------------------------------------------------------------------------------
def test_the_cluster_refuses_every_request_without_the_token(cluster, tmp_path):
    url = f"{cluster['address']}/api/jobs/"
    assert request(url)[0] == 401
    assert request(url, "not-the-token")[0] == 403
    assert request(url, TOKEN)[0] == 200
    before = set(jobs(cluster))

    out = dpn_submit(cluster, "--", "python", "-c", "print('should never run')", token=None)
    assert out.returncode == 2, out.stderr
    assert "requires token authentication" in out.stderr and "no Ray auth token was found" in out.stderr
    assert "dpn-ray-token" in out.stderr and "Traceback" not in out.stderr
    wrong = tmp_path / "token"
    wrong.write_text("0" * 64 + "\n")
    out = dpn_submit(cluster, "--token-file", str(wrong), "--", "python", "-c", "print('should never run')", token=None)
    assert out.returncode == 2 and "the Ray auth token was refused" in out.stderr, out.stderr
    empty = tmp_path / "empty"
    empty.write_text("\n")
    out = dpn_submit(cluster, "--token-file", str(empty), "--", "python", "-c", "pass", token=None)
    assert out.returncode == 2 and f"the Ray auth token file {str(empty)!r} is empty" in out.stderr, out.stderr
    assert set(jobs(cluster)) == before, "a refused client must not have started a job"

    # The GCS refuses a driver with the wrong token too (not only the dashboard's HTTP API).
    env = dict(cluster["env"], RAY_AUTH_TOKEN="0" * 64)
    probe = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={cluster['gcs']!r}); print('joined')"],
                           env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert probe.returncode != 0 and "joined" not in probe.stdout, probe.stdout + probe.stderr[-2000:]


# ----- failed jobs and --resubmit -----------------------------------------------------------------------
def test_a_failed_job_is_reported_not_run_again_unless_resubmitted(cluster):
    sid = f"dpn-test-fail-{secrets.token_hex(3)}"
    cmd = ["--submission-id", sid, "--follow", "--", "python", "-c",
           "import sys; print('attempt ran'); sys.exit(3)"]
    first = dpn_submit(cluster, *cmd)
    assert first.returncode == 1 and "attempt ran" in first.stdout and f"job {sid} FAILED" in first.stderr
    started = jobs(cluster)[sid]["start_time"]

    again = dpn_submit(cluster, *cmd)
    assert again.returncode == 1, again.stderr
    assert f"job {sid} already ran" in again.stderr and "FAILED; not running it again" in again.stderr
    assert "exit code 3" in again.stderr and "--resubmit" in again.stderr
    assert "attempt ran" not in again.stdout
    assert jobs(cluster)[sid]["start_time"] == started and not [j for j in jobs(cluster) if j.startswith(f"{sid}-")]

    resubmitted = dpn_submit(cluster, "--resubmit", *cmd)
    assert resubmitted.returncode == 1 and "attempt ran" in resubmitted.stdout
    assert f"submission id {sid}-r2" in resubmitted.stderr
    third = dpn_submit(cluster, "--resubmit", *cmd)
    assert f"submission id {sid}-r3" in third.stderr
    assert {j: s["status"] for j, s in jobs(cluster).items() if j.startswith(sid)} == {
        sid: "FAILED", f"{sid}-r2": "FAILED", f"{sid}-r3": "FAILED"}

    ok = f"dpn-test-ok-{secrets.token_hex(3)}"
    done = dpn_submit(cluster, "--submission-id", ok, "--follow", "--", "python", "-c", "print('fine')")
    assert done.returncode == 0 and "fine" in done.stdout
    repeat = dpn_submit(cluster, "--submission-id", ok, "--follow", "--resubmit", "--", "python", "-c", "print('fine')")
    assert repeat.returncode == 0 and "already SUCCEEDED" in repeat.stderr and "fine" not in repeat.stdout
    assert [j for j in jobs(cluster) if j.startswith(ok)] == [ok]


# ----- log streaming ---------------------------------------------------------------------------------
TICKS = "import time\nfor i in range(4):\n    print(f'tick {i}', flush=True)\n    time.sleep(1.5)\n"


def test_logs_are_streamed_while_the_job_runs(cluster):
    sid = f"dpn-test-tail-{secrets.token_hex(3)}"
    env = base_env(HOME=str(cluster["tmp"]), RAY_AUTH_TOKEN=TOKEN)
    p = subprocess.Popen([str(BIN / "dpn"), "submit", "--address", cluster["address"], "--submission-id", sid,
                          "--follow", "--", "python", "-c", TICKS], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in p.stdout:
        seen.append((time.time(), line.rstrip("\n")))
    p.wait(timeout=120)
    end = time.time()
    ticks = [(t, line) for t, line in seen if re.fullmatch(r"tick \d", line)]
    assert [line for _, line in ticks] == ["tick 0", "tick 1", "tick 2", "tick 3"], seen
    assert p.returncode == 0
    # The first tick reached us while the job still had ~4.5 s of sleeping ahead: streamed, not at the end.
    assert end - ticks[0][0] > 3.0, [(round(end - t, 1), line) for t, line in ticks]


def test_follow_reads_the_log_tail_not_the_whole_log(cluster, monkeypatch):
    """`follow` streams with `tail_job_logs`; it never re-downloads the log (`get_job_logs`)."""
    from ray.job_submission import JobSubmissionClient

    from jobs import submit

    def no_polling(*_a, **_k):
        raise AssertionError("follow() downloaded the whole log")

    monkeypatch.setattr(JobSubmissionClient, "get_job_logs", no_polling)
    client = submit.connect(cluster["address"], TOKEN)
    sid = client.submit_job(entrypoint=f"python -c {shlex.quote(TICKS)}")
    out = io.StringIO()
    assert submit.follow(client, sid, timeout=120, out=out) == "SUCCEEDED"
    assert [line for line in out.getvalue().splitlines() if line.startswith("tick")] == [f"tick {i}" for i in range(4)]


# ----- the pipeline across both nodes -------------------------------------------------------------------
def actors_of(cluster, job_id: str) -> list[dict]:
    status, body = request(f"{cluster['address']}/api/v0/actors?limit=10000&detail=1", TOKEN)
    assert status == 200, body
    return [a for a in json.loads(body)["data"]["result"]["result"] if a.get("job_id") == job_id]


# ~4-5 min on an idle 2-core machine; the default 600 s is too tight when the machine is shared.
@pytest.mark.timeout(1700)
def test_pipeline_trains_and_evaluates_on_both_nodes_and_logs_to_mlflow(cluster, mlflow_server, tmp_path, monkeypatch):
    from ray.job_submission import JobSubmissionClient

    from pipelines import registry, tracking

    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(PIPELINE)
    sid = f"dpn-test-pipeline-{secrets.token_hex(3)}"
    out = dpn_submit(cluster, "--mlflow-uri", mlflow_server["uri"], "--submission-id", sid, "--follow",
                     "--timeout", "1500", "--", "dpn", "pipeline", "run", "--config", str(cfg),
                     "--work-dir", str(tmp_path / "work"), timeout=1600)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert f"job {sid} SUCCEEDED" in out.stderr

    # Placement, from Ray's state API: which node ran each training worker and each evaluation actor.
    job_id = JobSubmissionClient(cluster["address"], headers={"Authorization": f"Bearer {TOKEN}"}).get_job_info(sid).job_id
    actors = actors_of(cluster, job_id)
    nodes = cluster["nodes"]
    name = {v: k for k, v in nodes.items()}
    train = [name[a["node_id"]] for a in actors if a["class_name"] == "RayTrainWorker"]
    shards = [name[a["node_id"]] for a in actors if a["class_name"] == "ShardRunner"]
    # stage 1 + two stage-2 variants, 2 workers each, one per node (2 x 2 CPUs do not fit a 3-CPU node).
    assert len(train) >= 6 and train.count("head") == train.count("worker"), train
    assert set(shards) == {"head", "worker"}, shards

    # MLflow: as the admin, read what the pipeline logged as its own user.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", mlflow_server["admin"][0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", mlflow_server["admin"][1])
    uri = mlflow_server["uri"]
    summary = json.loads([line for line in out.stdout.splitlines() if line.startswith('{"status"')][-1])
    assert summary["tracking_uri"] == uri
    parent = tracking.get_run(summary["parent_run_id"], tracking_uri=uri)
    assert parent["status"] == "FINISHED" and parent["tags"]["dpn.trigger"] == "manual"
    steps = {c["run_name"]: c for c in tracking.child_runs(summary["parent_run_id"], tracking_uri=uri)}
    assert {"synth", "stage0_vision", "stage0_llm", "stage1", "stage2_dpn", "stage2_none", "route_calibrate",
            "evaluate", "register"} <= set(steps)
    assert tracking.metric_history(steps["stage2_dpn"]["run_id"], "loss/lm", tracking_uri=uri)
    model = tracking.download_artifacts(steps["stage2_dpn"]["run_id"], "model", tmp_path / "dl", tracking_uri=uri)
    assert (model / "model.safetensors").is_file()
    champion = tracking.get_alias("dpn", registry.CHAMPION, tracking_uri=uri)
    # The dpn variant is registered as calibrated: the model logged by the route_calibrate step's run.
    assert champion is not None and champion["run_id"] == steps["route_calibrate"]["run_id"]
    # The pipeline's user created the experiment, so it holds MANAGE on it.
    assert permission(uri, mlflow_server["admin"], PIPELINE_USER, parent["experiment_id"]) == "MANAGE"
