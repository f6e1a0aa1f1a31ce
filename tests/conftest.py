"""Test-session environment: offline, CPU DeepSpeed, no Ray telemetry (set before any library import), and
the tiny checkpoints the evaluation and inference tests share."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

N_EVAL = 15  # the synthetic generator's minimum: one question per (category, difficulty) cell


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """A synthetic corpus (eval set in LLaVA's layout + tokenizer) and two tiny random checkpoints: one with
    routers (saved as dpn) and one saved as none (tests/test_evaluation.py, tests/test_inference.py)."""
    import torch

    from dpn.modeling_dpn import DPNForConditionalGeneration
    from dpn.presets import test_tiny
    from dpn.tokenizer import ROUTER_ID, load_tokenizer
    from pipelines.data.synth.corpus import generate_corpus

    root = tmp_path_factory.mktemp("eval")
    generate_corpus(root / "corpus", n_pretrain=20, n_instruct=20, n_eval=N_EVAL, vocab_size=300)
    tok = load_tokenizer(root / "corpus" / "tokenizer")
    dirs = {}
    for compressor in ("dpn", "none"):
        torch.manual_seed(0)
        cfg = test_tiny(vocab_size=len(tok), image_token_id=4, pad_token_id=3, router_token_id=ROUTER_ID,
                        compressor=compressor)
        model = DPNForConditionalGeneration(cfg)
        # A larger output projection makes greedy answers depend on the input, so mixed-up questions or
        # batches would show in the predictions.
        with torch.no_grad():
            model.language_model.lm_head.weight.normal_(0.0, 2.0)
        d = root / f"model-{compressor}"
        model.save_pretrained(d)
        tok.save_pretrained(d)
        dirs[compressor] = d
    return {"root": root, "data_root": root / "corpus" / "eval", "model": dirs["dpn"], "model_none": dirs["none"]}
