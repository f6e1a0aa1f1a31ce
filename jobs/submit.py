"""`dpn submit`: run the pipeline (or one step) on a Ray cluster as a Ray job and follow its logs.

    dpn submit --address http://HEAD:8265 [--submission-id ID] [--follow] -- dpn pipeline run --recipe tiny

The repository is shipped as the job's `working_dir`; the MLflow tracking URI (and a parent run id, when
given) travel in the job's environment.

Authentication: a cluster started with Ray token auth (`RAY_AUTH_MODE=token`, KubeRay's
`authOptions: {mode: token}`) refuses every request without its token. The token is sent as a bearer
token, taken from the first of: `--token-file`, $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH,
~/.ray/auth_token (the places Ray itself looks, in Ray's order). A refused token stops with exit 2.

Submission ids and re-runs: the id is stable (by default derived from the entrypoint and the code
version), so a retried client never starts the same pipeline twice. For an id Ray already knows:
a pending or running job is followed; a succeeded one is reported (exit 0); a failed or stopped one is
reported with Ray's message and NOT run again (exit 1): `--resubmit` runs it again under the next free id
`<id>-r2`, `<id>-r3`, ... so that every attempt keeps its own logs.

Logs are streamed with Ray's log tail (`JobSubmissionClient.tail_job_logs`, one WebSocket), each line once.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
RERUNNABLE = {"FAILED", "STOPPED"}
# Never shipped to the cluster: environments, caches and local run outputs.
EXCLUDES = [".venv", ".git", ".dpn_work", "**/__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info", "mlruns"]
TOKEN_HELP = ("set RAY_AUTH_TOKEN or pass --token-file; on Kubernetes: kubectl -n NAMESPACE get secret "
              "dpn-ray-token -o jsonpath='{.data.auth_token}' | base64 -d > token (infra/README.md)")


class SubmitError(Exception):
    """A problem the user can fix (address, token, submission id): printed without a traceback, exit 2."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="submit a command (e.g. `dpn pipeline run ...`) to a Ray cluster as a job")
    p.add_argument("--address", required=True, help="Ray dashboard/job server address, e.g. http://127.0.0.1:8265")
    p.add_argument("--submission-id", default=None, help="stable id (default: derived from entrypoint + code)")
    p.add_argument("--resubmit", action="store_true",
                   help="if the id names a FAILED or STOPPED job, run it again as <id>-r2, <id>-r3, ...")
    p.add_argument("--token-file", default=None,
                   help="file holding the cluster's Ray auth token (default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, "
                        "~/.ray/auth_token)")
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


def resolve_token(token_file: str | None = None) -> str | None:
    """The Ray auth token to send, or None when none is configured (a cluster without auth).

    Args:
        token_file: explicit token file (`--token-file`); wins over the environment.
    Returns:
        The token, stripped of surrounding whitespace.
    Raises:
        SubmitError: a named token file is missing, unreadable or empty.
    """
    if token_file is None and os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    named = token_file or os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named).expanduser() if named else Path.home() / ".ray" / "auth_token"
    if not named and not path.is_file():
        return None
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise SubmitError(f"cannot read the Ray auth token file {str(path)!r}: {e.strerror}") from None
    if not token:
        raise SubmitError(f"the Ray auth token file {str(path)!r} is empty")
    return token


def connect(address: str, token: str | None):
    """A `JobSubmissionClient` for `address` that sends `token`; a refused token is a `SubmitError`."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    # Our own header, so the token does not depend on this process's RAY_AUTH_MODE (Ray only adds its
    # header when the client process itself runs in token mode).
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as e:
        first = str(e).splitlines()[0]
        what = "no Ray auth token was found" if token is None else "the Ray auth token was refused"
        raise SubmitError(f"{address} requires token authentication and {what} ({first}): {TOKEN_HELP}") from None
    except ConnectionError as e:
        raise SubmitError(f"cannot reach the Ray job server at {address!r}: {e}") from None


def job_status(client, submission_id: str) -> str | None:
    """The job's status name, or None if the cluster has no job with this submission id."""
    try:
        return str(client.get_job_status(submission_id).value)
    except RuntimeError as e:
        if "does not exist" in str(e):
            return None
        raise


@dataclass(frozen=True)
class Submission:
    """What `submit` did: the id to follow, whether it started a job, and the status it found if not."""

    submission_id: str
    submitted: bool
    existing_status: str | None = None
    message: str | None = None


def _next_free_id(client, submission_id: str) -> str:
    n = 2
    while job_status(client, f"{submission_id}-r{n}") is not None:
        n += 1
    return f"{submission_id}-r{n}"


def submit(client, entrypoint: str, submission_id: str | None = None, mlflow_uri: str | None = None,
           parent_run_id: str | None = None, resubmit: bool = False, agent_wait_s: float = 300.0) -> Submission:
    """Submit `entrypoint` as a Ray job, unless its submission id already names one.

    Args:
        client: a `JobSubmissionClient` (see `connect`).
        entrypoint: the shell command the job runs.
        submission_id: stable id; default `default_submission_id(entrypoint)`.
        mlflow_uri / parent_run_id: passed to the job's environment.
        resubmit: run a FAILED or STOPPED job again under the next free `<id>-rN`.
        agent_wait_s: how long to retry while a fresh head's job agent is not up yet.
    Returns:
        A `Submission`: `submitted` is False when the id named an existing job, whose status is then
        in `existing_status` (and Ray's message in `message`).
    """
    sid = submission_id or default_submission_id(entrypoint)
    status = job_status(client, sid)
    if status is not None:
        if status not in RERUNNABLE or not resubmit:
            return Submission(sid, False, status, client.get_job_info(sid).message)
        sid = _next_free_id(client, sid)
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
            return Submission(sid, True)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


def follow(client, submission_id: str, timeout: float | None = None, out: TextIO | None = None,
           settle_s: float = 30.0) -> str:
    """Stream the job's logs to `out` (stdout) as the driver writes them, until the job ends.

    Args:
        client: a `JobSubmissionClient`.
        submission_id: the job to follow.
        timeout: give up (TimeoutError) after this many seconds; the job keeps running.
        settle_s: how long to wait, after the log stream closed, for the status to turn terminal.
    Returns:
        The job's terminal status (SUCCEEDED, FAILED or STOPPED).
    """
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    again = f"follow it again with: dpn submit --submission-id {submission_id} --follow -- <same command>"
    try:
        asyncio.run(asyncio.wait_for(tail(), timeout))
    except TimeoutError:
        status = job_status(client, submission_id)
        raise TimeoutError(f"job {submission_id} still {status} after {timeout:.0f}s; {again}") from None
    except RuntimeError as e:  # the WebSocket dropped (head restarted, network): the job may well go on
        raise RuntimeError(f"lost the log stream of job {submission_id} ({e}); {again}") from None
    # The server closes the stream once the job is terminal and its last lines are sent; the status
    # API can trail that by a moment.
    deadline = time.time() + settle_s
    while (status := job_status(client, submission_id)) not in TERMINAL:
        if time.time() > deadline:
            raise RuntimeError(f"the log stream of job {submission_id} closed while it is {status}; {again}")
        time.sleep(0.5)
    return status


def run(args: argparse.Namespace) -> int:
    words = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    if not words:
        print("dpn submit: error: give the command to run after `--`, e.g. -- dpn pipeline run --recipe tiny",
              file=sys.stderr)
        return 2
    entrypoint = shlex.join(words)
    try:
        client = connect(args.address, resolve_token(args.token_file))
        sub = submit(client, entrypoint, args.submission_id, args.mlflow_uri, args.parent_run_id, args.resubmit)
    except SubmitError as e:
        print(f"dpn submit: error: {e}", file=sys.stderr)
        return 2
    sid = sub.submission_id
    if not sub.submitted:
        if sub.existing_status in RERUNNABLE:
            print(f"dpn submit: job {sid} already ran on {args.address} and is {sub.existing_status}; not running "
                  f"it again.\n  Ray says: {(sub.message or '').strip()[:2000]}\n  Logs: ray job logs "
                  f"--address {args.address} {sid}\n  To run it again: the same command with --resubmit "
                  f"(as {sid}-rN), or with a new --submission-id.", file=sys.stderr)
            return 1
        if sub.existing_status == "SUCCEEDED":
            print(f"dpn submit: job {sid} already SUCCEEDED on {args.address}; not running it again", file=sys.stderr)
            print(sid)
            return 0
        print(f"dpn submit: job {sid} is already {sub.existing_status} on {args.address}; following it instead of "
              f"submitting it again", file=sys.stderr)
    print(f"dpn submit: submission id {sid}", file=sys.stderr)
    if not args.follow:
        print(sid)
        return 0
    try:
        status = follow(client, sid, args.timeout)
    except (TimeoutError, RuntimeError) as e:
        print(f"dpn submit: error: {e}", file=sys.stderr)
        return 1
    print(f"dpn submit: job {sid} {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1
