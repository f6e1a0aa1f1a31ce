"""The registered model as an MLflow pyfunc (`pipelines.serving`, logged by `pipelines.tracking`): the
registry gate registers it, `mlflow.pyfunc.load_model("models:/<name>@champion")` answers as `dpn eval run`
does (image paths and image bytes), and `mlflow models serve` answers the same over HTTP."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipelines import registry, tracking

QUESTIONS = slice(4, 9)  # five questions; the tiny random model answers question 7 unlike the others


@pytest.fixture(scope="module")
def registered(assets, tmp_path_factory):
    """A tiny dpn checkpoint registered through the gate (champion) in a fresh SQLite store."""
    work = tmp_path_factory.mktemp("serving")
    uri = tracking.resolve_tracking_uri(work_dir=work)
    run = tracking.RunTracker.open(tracking_uri=uri, work_dir=work, run_name="stage2")
    gate = registry.register_and_gate(run.run_id, "dpn-serve", {"score": 0.5, "tflops": 1.0},
                                      gate_metric="synthetic/accuracy", compressor="dpn", tracking_uri=uri,
                                      model_dir=str(assets["model"]))
    run.finish()
    return {"uri": uri, "work": work, "gate": gate, "run_id": run.run_id}


def _questions(assets):
    bench = assets["data_root"] / "synthetic"
    rows = [json.loads(line) for line in (bench / "questions.jsonl").read_text().splitlines()[QUESTIONS]]
    return [(str(bench / "images" / r["image"]), r["text"], r["question_id"]) for r in rows]


def _expected(assets):
    """What `dpn eval run` answers (`dpn.inference.predict`) for the same questions."""
    from dpn import inference
    from dpn.eval.benchmarks import EvalItem

    model, processor = inference.load_model_and_processor(assets["model"], "dpn")
    items = [EvalItem(question_id=qid, text=text, image=image) for image, text, qid in _questions(assets)]
    return [r["text"] for r in inference.predict(model, processor, items, batch_size=8, compressor="dpn",
                                                  benchmark="synthetic", model_id="m", max_new_tokens=16)]


def test_gate_registers_a_pyfunc_that_answers_from_the_champion_alias(registered, assets, monkeypatch, tmp_path):
    import mlflow.pyfunc
    import pandas as pd

    assert registered["gate"]["promoted"] and registered["gate"]["version"] == "1"
    uri = registered["uri"]
    for alias in (registry.CHAMPION, registry.CHALLENGER):
        assert tracking.get_alias("dpn-serve", alias, uri)["run_id"] == registered["run_id"]
    # The HF directory is still what download_model hands to from_pretrained.
    hf = tracking.download_model("dpn-serve", alias=registry.CHAMPION, dst_dir=tmp_path / "dl", tracking_uri=uri)
    assert (hf / "config.json").is_file() and (hf / "model.safetensors").is_file()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model("models:/dpn-serve@champion")
    assert model.model_config == {"compressor": "dpn", "budget": None, "batch_size": 8}
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["image", "question"]
    questions = _questions(assets)
    # Paths for all but the second question, whose image goes in as bytes.
    images = [Path(p).read_bytes() if i == 1 else p for i, (p, _, _) in enumerate(questions)]
    out = model.predict(pd.DataFrame({"image": images, "question": [q for _, q, _ in questions]}))
    expected = _expected(assets)
    assert list(out.columns) == ["answer"] and out["answer"].tolist() == expected
    assert len(set(expected)) > 1
    with pytest.raises(Exception, match="neither an existing file nor base64"):
        model.predict(pd.DataFrame({"image": ["/no/such/image.png"], "question": ["What color?"]}))
    # Read as corpus images are (dpn.image_io): bad bytes and a FIFO (which would block an open) are refused.
    with pytest.raises(Exception, match="row 0: image not readable"):
        model.predict(pd.DataFrame({"image": [b"not an image"], "question": ["What color?"]}))
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    with pytest.raises(Exception, match="row 1: image not readable.*not a regular file"):
        model.predict(pd.DataFrame({"image": [questions[0][0], str(fifo)], "question": ["What color?"] * 2}))


def test_registering_again_from_the_same_run_keeps_the_earlier_versions_files(registered, assets):
    """A re-run of the register step (a scorer fix re-runs it alone; the source run stays cached) logs a new
    pyfunc beside the first: version 1, maybe the champion, keeps its files."""
    uri = registered["uri"]
    again = registry.register_and_gate(registered["run_id"], "dpn-serve", {"score": 0.5, "tflops": 1.0},
                                       gate_metric="synthetic/accuracy", compressor="dpn", tracking_uri=uri,
                                       model_dir=str(assets["model"]))
    assert again["version"] == "2" and not again["promoted"]
    v1, v2 = (tracking.get_alias("dpn-serve", a, uri) for a in (registry.CHAMPION, registry.CHALLENGER))
    assert v1["version"] == "1" and v2["version"] == "2" and v1["source"] != v2["source"]
    assert {v1["run_id"], v2["run_id"]} == {registered["run_id"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_over_http(registered, assets):
    port = _free_port()
    bin_dir = Path(sys.executable).parent  # the server starts `uvicorn` from PATH, as in an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"], "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    mlflow_cli = bin_dir / "mlflow"
    log = (registered["work"] / "serve.log").open("w")
    proc = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", "models:/dpn-serve@champion",
                             "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port), "-w", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start: {(registered['work'] / 'serve.log').read_text()[-3000:]}")
            time.sleep(1)
        questions = _questions(assets)
        # JSON carries bytes as base64 text: the first image goes that way, the others as paths.
        data = [[base64.b64encode(Path(p).read_bytes()).decode() if i == 0 else p, q]
                for i, (p, q, _) in enumerate(questions)]
        body = json.dumps({"dataframe_split": {"columns": ["image", "question"], "data": data}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                answers = [row["answer"] for row in json.loads(r.read())["predictions"]]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"/invocations answered {e.code}: {[ln[:300] for ln in json.loads(e.read())['stack_trace'].splitlines()][-12:]}") from None
        assert answers == _expected(assets)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
