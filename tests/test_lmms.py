"""The lmms-eval plugin (`dpn_lmms`, the `[lmms]` extra): lmms-eval finds the `dpn` model through the
`lmms_eval.models` entry point and, on a local task over the synthetic benchmark's questions, answers
exactly as `dpn eval run` does (`dpn.inference.predict`, what its shard workers call) and scores
multiple-choice options with the log-likelihoods `dpn.inference.continuation_logprobs` computes one
request at a time. Nothing is read from the hub."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lmms_eval  # noqa: F401  make install installs it: missing, the install is broken, not the test skippable
import pytest

TASK_DIR = Path(__file__).parent / "lmms_task"




def _write_task(assets, out: Path) -> list[dict]:
    """The task folder (YAML + utils) with questions.jsonl: the synthetic questions, images as absolute
    paths, answers, and as options the answer and one other of its category's answer space (two options
    keep the log-likelihood requests few; the order differs between questions)."""
    from pipelines.data.synth.questions import ANSWERS

    shutil.copytree(TASK_DIR, out)
    bench = assets["data_root"] / "synthetic"
    truth = {r["question_id"]: r for r in map(json.loads, (bench / "ground_truth.jsonl").read_text().splitlines())}
    docs = []
    for q in map(json.loads, (bench / "questions.jsonl").read_text().splitlines()):
        answer = truth[q["question_id"]]["answer"]
        other = next(a for a in ANSWERS[q["category"]] if a != answer)
        options = [answer, other] if q["question_id"] % 2 else [other, answer]
        docs.append({"question_id": q["question_id"], "text": q["text"], "image": str(bench / "images" / q["image"]),
                     "answer": answer, "options": options})
    (out / "questions.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return docs


def test_the_entry_point_registers_dpn():
    from lmms_eval.models import get_model

    from dpn_lmms.model import DPNLmms

    assert get_model("dpn") is DPNLmms


def test_lmms_eval_answers_as_dpn_eval(assets, tmp_path, monkeypatch):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from dpn import inference
    from dpn.eval.benchmarks import EvalItem

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    docs = _write_task(assets, tmp_path / "task")
    results = simple_evaluate(
        model="dpn", model_args=f"pretrained={assets['model']},compressor=dpn", batch_size=4,
        tasks=["dpn_synthetic", "dpn_synthetic_choice"], task_manager=TaskManager(include_path=str(tmp_path / "task"), include_defaults=False),
        log_samples=True, process_docs_parallel=1)
    samples = {task: sorted(s, key=lambda s: s["doc_id"]) for task, s in results["samples"].items()}

    # generate_until: the answers `dpn eval run` writes for the same questions (its default 16 new tokens).
    model, processor = inference.load_model_and_processor(assets["model"], "dpn")
    items = [EvalItem(question_id=d["question_id"], text=d["text"], image=d["image"]) for d in docs]
    expected = [r["text"] for r in inference.predict(model, processor, items, batch_size=4, compressor="dpn",
                                                     benchmark="synthetic", model_id="m", max_new_tokens=16)]
    got = [s["filtered_resps"][0] for s in samples["dpn_synthetic"]]
    assert got == expected
    assert len(set(expected)) > 1  # the answers depend on the question, so a mix-up would show

    # loglikelihood: batched (4, left padded, several prompt lengths) equals one request at a time.
    from PIL import Image

    requests = [(d["text"], Image.open(d["image"]).convert("RGB"), " " + option) for d in docs for option in d["options"]]
    reference = inference.continuation_logprobs(model, processor, requests, compressor="dpn", batch_size=1)
    got_ll = []
    for s in samples["dpn_synthetic_choice"]:
        got_ll += [tuple(r[0]) for r in s["resps"]]
    assert len(got_ll) == len(reference)
    for (lp, greedy), (ref_lp, ref_greedy) in zip(got_ll, reference, strict=True):
        assert lp == pytest.approx(ref_lp, rel=1e-4, abs=1e-4) and greedy == ref_greedy
    assert len({round(lp, 3) for lp, _ in reference}) > 1


def test_bad_model_args_name_the_value(assets):
    from dpn_lmms.model import DPNLmms

    with pytest.raises(ValueError, match="unknown \\['budgte'\\]"):
        DPNLmms(pretrained=str(assets["model"]), budgte=0.5)
    with pytest.raises(ValueError, match="compressor must be one of .*'bogus'"):
        DPNLmms(pretrained=str(assets["model"]), compressor="bogus")
