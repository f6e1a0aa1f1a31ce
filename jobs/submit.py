"""`dpn submit`: run the pipeline (or one step) on a Ray cluster as a Ray job and follow its logs.

    dpn submit --address http://HEAD:8265 [--submission-id ID] [--follow] -- dpn pipeline run --recipe tiny

The repository is shipped as the job's `working_dir`; the MLflow tracking URI (and a parent run id, when
given) travel in the job's environment. The submission id is stable — by default derived from the
entrypoint and the code version — so a client that retries never starts the same pipeline twice: an id
Ray already knows is followed instead of re-submitted.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Never shipped to the cluster: environments, caches and local run outputs.
EXCLUDES = [".venv", ".git", ".dpn_work", "**/__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info", "mlruns"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="submit a command (e.g. `dpn pipeline run ...`) to a Ray cluster as a job")
    p.add_argument("--address", required=True, help="Ray dashboard/job server address, e.g. http://127.0.0.1:8265")
    p.add_argument("--submission-id", default=None, help="stable id (default: derived from entrypoint + code)")
    p.add_argument("--mlflow-uri", default=None, help="tracking URI for the job (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--parent-run-id", default=None, help="MLflow parent run the job's runs attach to")
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit with its status")
    p.add_argument("--timeout", type=float, default=None, help="with --follow: give up after this many seconds")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- then the command the job runs")
    p.set_defaults(handler=run)


def default_submission_id(entrypoint: str) -> str:
    from pipelines.dag import code_version

    digest = hashlib.sha256(f"{entrypoint}\0{code_version()}".encode()).hexdigest()[:12]
    return f"dpn-{digest}"


def submit(address: str, entrypoint: str, submission_id: str | None = None, mlflow_uri: str | None = None,
           parent_run_id: str | None = None, agent_wait_s: float = 300.0) -> str:
    """Submit `entrypoint` as a Ray job (or find the job this id already names). Returns the submission id."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    sid = submission_id or default_submission_id(entrypoint)
    try:
        client.get_job_info(sid)
        print(f"dpn submit: job {sid} already exists on {address}; following it instead of re-submitting",
              file=sys.stderr)
        return sid
    except RuntimeError:
        pass  # unknown id: submit it
    env = {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    uri = mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    if parent_run_id:
        env["DPN_PARENT_RUN_ID"] = parent_run_id
    # A freshly started head answers before its job agent is up ("No available agent to submit job"):
    # retry that, and only that, for a while.
    deadline = time.time() + agent_wait_s
    while True:
        try:
            client.submit_job(
                entrypoint=entrypoint,
                submission_id=sid,
                runtime_env={"working_dir": str(ROOT), "excludes": EXCLUDES, "env_vars": env},
                metadata={"project": "dpn"},
            )
            return sid
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


def follow(address: str, submission_id: str, timeout: float | None = None, poll_s: float = 1.0) -> str:
    """Print the job's logs as they grow until it reaches a terminal status; return that status."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    printed = 0
    t0 = time.time()
    while True:
        status = str(client.get_job_status(submission_id).value)
        logs = client.get_job_logs(submission_id)
        if len(logs) > printed:
            sys.stdout.write(logs[printed:])
            sys.stdout.flush()
            printed = len(logs)
        if status in TERMINAL:
            return status
        if timeout is not None and time.time() - t0 > timeout:
            raise TimeoutError(f"job {submission_id} still {status} after {timeout:.0f}s")
        time.sleep(poll_s)


def run(args: argparse.Namespace) -> int:
    words = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    if not words:
        print("dpn submit: error: give the command to run after `--`, e.g. -- dpn pipeline run --recipe tiny",
              file=sys.stderr)
        return 2
    entrypoint = shlex.join(words)
    sid = submit(args.address, entrypoint, args.submission_id, args.mlflow_uri, args.parent_run_id)
    print(f"dpn submit: submission id {sid}", file=sys.stderr)
    if not args.follow:
        print(sid)
        return 0
    status = follow(args.address, sid, args.timeout)
    print(f"dpn submit: job {sid} {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1
