"""Inference on one device (`dpn.inference`) and the processor that builds its inputs (`DPNProcessor`):
checkpoints refused where a compressor lacks weights, batched answers equal to one-at-a-time ones, and the
processor's inputs equal to what `predict` feeds the model."""

from __future__ import annotations

import pytest

from dpn import inference
from pipelines.evaluation.benchmarks import load_benchmark


def test_path_label():
    assert inference.path_label([2, 1, 0], [1, 2, 4]) == "4-2-1"
    assert inference.path_label([1, -1, -1], [1, 2, 4]) == "2-n-n"


def test_dpn_needs_router_weights(assets):
    inference.check_checkpoint(assets["model_none"], "static")  # no routers needed
    with pytest.raises(ValueError, match="no router weights"):
        inference.check_checkpoint(assets["model_none"], "dpn")
    with pytest.raises(ValueError, match="no router weights"):
        inference.load_model(assets["model_none"], "dpn")
    model = inference.load_model(assets["model"], "static")
    assert model.config.compressor == "static" and not model.training


def test_predictions_at_batch_8_equal_batch_1_with_routes_that_differ(assets):
    """Evaluation batches of 8 (equal-length prompts among them, samples on different routing paths) answer
    exactly as one question at a time."""
    import torch

    from dpn.conversation import encode_prompt
    from dpn.processing_dpn import DPNProcessor
    from dpn.tokenizer import load_tokenizer

    class SensitiveRouter(torch.nn.Module):
        # A random tiny LLM's router inputs differ little between questions; this router turns small input
        # differences into different experts, so that one batch holds samples on different paths.
        def __init__(self, d, n_experts):
            super().__init__()
            self.norm = torch.nn.LayerNorm(d)
            self.register_buffer("v", torch.randn(d, n_experts, generator=torch.Generator().manual_seed(0)))

        def forward(self, x):
            return 100.0 * torch.sin(50.0 * self.norm(x) @ self.v).float()

    model = inference.load_model(assets["model"], "dpn")
    for name in list(model.routers):
        model.routers[name] = SensitiveRouter(model.config.text_config.hidden_size, len(model.config.experts))
    tok = load_tokenizer(assets["model"])
    proc = DPNProcessor.from_model_config(model.config, tok)
    import dataclasses

    items = load_benchmark("synthetic", assets["data_root"]).items
    # Eight questions of one text on eight images (one prompt length: no padding at all), then the benchmark.
    same = [dataclasses.replace(items[0], question_id=1000 + i, image=it.image) for i, it in enumerate(items[:8])]
    items = same + items
    n_img = model.config.num_image_tokens
    length = {it.question_id: len(encode_prompt(it.text, tok, "vicuna_v1", n_img, it.has_image, True)) for it in items}
    kw = dict(compressor="dpn", benchmark="synthetic", model_id="m", max_new_tokens=4)
    one = inference.predict(model, proc, items, batch_size=1, **kw)
    eight = inference.predict(model, proc, items, batch_size=8, **kw)
    paths = [r["metadata"]["routing_path"] for r in one]
    # The case that used to go wrong: a batch whose prompts all have one length, on different paths.
    assert any(
        len({length[it.question_id] for it in items[s : s + 8]}) == 1 and len(set(paths[s : s + 8])) > 1
        for s in range(0, len(items), 8)
    ), ([length[it.question_id] for it in items], paths)
    assert [r["text"] for r in eight] == [r["text"] for r in one]
    assert [r["metadata"]["routing_path"] for r in eight] == paths


def _reference_inputs(tokenizer, image_processor, questions, images, num_image_tokens, router):
    """Model inputs built from the primitives, as `predict` built them before the processor existed:
    `encode_prompt`, `preprocess_images` per image, `collate` with left padding."""
    from dpn.collate import collate
    from dpn.conversation import encode_prompt
    from dpn.image_processing import preprocess_images

    samples = []
    for q, im in zip(questions, images, strict=True):
        ids = encode_prompt(q, tokenizer, "vicuna_v1", num_image_tokens, im is not None, router)
        pixels = preprocess_images([im], image_processor)[0] if im is not None else None
        samples.append({"input_ids": ids, "labels": ids, "pixel_values": pixels})
    return collate(samples, pad_token_id=tokenizer.pad_token_id, padding_side="left",
                   image_token_id=tokenizer.convert_tokens_to_ids("<image>"))


def test_processor_builds_what_predict_feeds_the_model_and_round_trips(assets, tmp_path, monkeypatch):
    import torch

    from dpn import DPNProcessor
    from dpn.image_processing import build_image_processor
    from dpn.tokenizer import load_tokenizer

    model = inference.load_model(assets["model"], "dpn")
    tok = load_tokenizer(assets["model"])
    proc = DPNProcessor.from_model_config(model.config, tok)
    assert (proc.num_image_tokens, proc.add_router_token, proc.template) == (model.config.num_image_tokens, True,
                                                                            "vicuna_v1")
    items = load_benchmark("synthetic", assets["data_root"]).items[:3]
    images = [items[0].open_image(), None, items[2].open_image()]  # a text-only question in the middle
    questions = [it.text for it in items]
    inputs = proc(images=images, text=questions)
    ref = _reference_inputs(tok, build_image_processor(model.config.vision_config.image_size), questions, images,
                            model.config.num_image_tokens, router=True)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    for key in inputs:
        assert torch.equal(inputs[key], ref[key]), key
    assert inputs["pixel_values"].shape[0] == 2 and bool((inputs["attention_mask"][:, -1] == 1).all())  # left padded
    assert (inputs["input_ids"][0] == model.config.router_token_id).sum() == 1

    # What `predict` hands to generate is exactly the processor's output.
    fed = {}
    real_generate = model.generate

    def spy(input_ids, **kw):
        fed.update(input_ids=input_ids, attention_mask=kw["attention_mask"], pixel_values=kw["pixel_values"])
        return real_generate(input_ids, **kw)

    monkeypatch.setattr(model, "generate", spy)
    with_images = [items[0], items[2]]
    inference.predict(model, proc, with_images, compressor="dpn", benchmark="synthetic", model_id="m",
                      batch_size=2, max_new_tokens=2)
    expected = proc(images=[it.open_image() for it in with_images], text=[it.text for it in with_images])
    for key in expected:
        assert torch.equal(fed[key], expected[key]), key

    # save_pretrained / from_pretrained: the tokenizer files plus a small processor config.
    proc.save_pretrained(tmp_path / "proc")
    assert (tmp_path / "proc" / "processor_config.json").is_file() and (tmp_path / "proc" / "tokenizer.json").is_file()
    again = DPNProcessor.from_pretrained(tmp_path / "proc")
    assert (again.num_image_tokens, again.add_router_token, again.template) == (proc.num_image_tokens, True, "vicuna_v1")
    reloaded = again(images=images, text=questions)
    for key in inputs:
        assert torch.equal(reloaded[key], inputs[key]), key
    with pytest.raises(ValueError, match="one image"):
        proc(images=[None], text=questions)
    with pytest.raises(ValueError, match="template"):
        DPNProcessor(proc.image_processor, tok, template="chatml", num_image_tokens=4)


def test_the_package_exports_the_model_api_lazily():
    import subprocess
    import sys

    code = ("import sys, dpn; assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
            "from dpn import DPNConfig, DPNForConditionalGeneration, DPNProcessor; "
            "assert DPNForConditionalGeneration.config_class is DPNConfig; "
            "import dpn.inference, dpn.processing_dpn, dpn.modeling_dpn, dpn.routing, dpn.eval.convert; "
            "bad = [m for m in ('ray', 'mlflow', 'deepspeed') if m in sys.modules]; assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    import dpn

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        dpn.Nope  # noqa: B018
