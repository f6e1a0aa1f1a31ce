"""FLOPs accounting: exact counts against torch's FlopCounterMode on tiny HF models and on the DPN model
itself, the FastV-convention formula against hand-computed values at LLaVA-1.5-7B geometry, the pyramid /
FastV / PDrop token arithmetic layer by layer, and the `dpn flops` CLI."""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlamaModel  # noqa: E402

from dpn.flops import (  # noqa: E402
    analytic_token_counts,
    flop_counter_mode,
    flops_report,
    llm_layer_flops,
    llm_prefill_flops,
    lm_head_flops,
    per_sample_tflops,
    projector_flops,
    vision_tower_flops,
)
from dpn.geometry import kept_count, pooled_grid  # noqa: E402
from dpn.presets import get_preset, test_tiny  # noqa: E402
from jobs.cli import main as cli_main  # noqa: E402


def _layer_flops(counts: dict, prefix: str, n_layers: int) -> list[int]:
    return [sum(counts[f"{prefix}.{i}"].values()) for i in range(n_layers)]


@pytest.fixture(scope="module")
def cfg7b():
    return get_preset("llava-1.5-7b")


# ----- exact convention vs FlopCounterMode ----------------------------------------------------------
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim",
    [(4, 4, None), (4, 2, None), (4, 1, 16)],  # MHA, GQA, MQA with head_dim != hidden / heads
    ids=["mha", "gqa", "mqa-wide-heads"],
)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_exact_count_matches_flop_counter_on_llama(heads, kv_heads, head_dim, attn):
    cfg = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=128,
    )
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = LlamaModel(cfg).eval()
    for n in (5, 33):
        with flop_counter_mode() as fc, torch.no_grad():
            model(torch.randint(0, 50, (1, n)))
        per_layer = _layer_flops(fc.get_flop_counts(), "LlamaModel.layers", 2)
        assert per_layer == [llm_layer_flops(n, cfg, "exact")] * 2
        # Nothing outside the decoder layers does matmuls (norm, rotary are excluded ops).
        assert fc.get_total_flops() == llm_prefill_flops(cfg, [n, n], "exact")


def test_exact_count_by_hand_and_lm_head():
    # hidden 32, 4 query heads of 8, 2 KV heads, FFN 72, n = 10:
    # q, o: 2*10*32*32 = 20480 each; k, v: 2*10*32*16 = 10240 each; QK^T, AV: 2*10*10*8*4 = 6400 each;
    # SwiGLU: 3 * 2*10*32*72 = 138240.  Sum = 40960 + 20480 + 12800 + 138240 = 212480.
    cfg = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=72, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2,
    )
    assert llm_layer_flops(10, cfg, "exact") == 212480
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with flop_counter_mode() as fc, torch.no_grad():
        model(torch.randint(0, 50, (1, 10)))
    counts = fc.get_flop_counts()
    assert sum(counts["LlamaForCausalLM.lm_head"].values()) == lm_head_flops(cfg, 10) == 2 * 10 * 32 * 50
    assert fc.get_total_flops() == 212480 + 2 * 10 * 32 * 50


def test_vision_tower_and_projector_counts():
    vc = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, image_size=16, patch_size=2,
    )
    torch.manual_seed(0)
    tower = CLIPVisionModel(vc).eval()
    with flop_counter_mode() as fc, torch.no_grad():
        tower(torch.randn(2, 3, 16, 16), output_hidden_states=True)
    counts = fc.get_flop_counts()
    total = fc.get_total_flops()
    assert total == vision_tower_flops(vc, upto_layer=None, n_images=2)
    # Layer -2's features need every layer but the last.
    last = sum(counts["CLIPVisionModel.encoder.layers.2"].values())
    assert total - last == vision_tower_flops(vc, upto_layer=-2, n_images=2)
    # By hand, one image: patch conv 2*64*(3*2*2)*32 = 49152; per layer on 65 tokens:
    # 4*2*65*32*32 + 4*65*65*32 + 2*2*65*32*37 = 532480 + 540800 + 307840 = 1381120.
    assert vision_tower_flops(vc, upto_layer=-2) == 49152 + 2 * 1381120
    assert vision_tower_flops(vc, upto_layer=0) == 49152

    cfg = test_tiny()  # vision 32 -> text 32, 64 image features: 2*64*32*32 twice
    assert projector_flops(cfg) == 2 * (2 * 64 * 32 * 32)


# ----- the FastV convention at 7B, by hand ------------------------------------------------------------
def test_fastv_formula_by_hand_at_7b(cfg7b):
    tc = cfg7b.text_config
    assert (tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers) == (4096, 11008, 32)
    # n = 576 + 64 = 640 tokens, d = 4096, m = 11008:
    #   4nd^2  = 4 * 640 * 16,777,216       = 42,949,672,960
    #   2n^2d  = 2 * 409,600 * 4096          =  3,355,443,200
    #   2ndm   = 2 * 640 * 4096 * 11008      = 57,713,623,040
    #   layer  = 104,018,739,200;  32 layers = 3,328,599,654,400 (3.33 TFLOPs)
    assert llm_layer_flops(640, tc, "fastv") == 104_018_739_200
    assert llm_prefill_flops(tc, [640] * 32, "fastv") == 3_328_599_654_400
    # exact (MHA, 3 FFN matrices, 2 per MAC) = 2 * (4nd^2 + 2n^2d + 3ndm)
    #   = 2 * (42,949,672,960 + 3,355,443,200 + 86,570,434,560) = 265,751,101,440 per layer
    assert llm_layer_flops(640, tc, "exact") == 265_751_101_440
    # PDrop's anchor, 3.82 TFLOPs for vanilla LLaVA-1.5-7B, is the fastv convention at ~732 tokens
    # (576 visual + ~156 text), not at 640: 64 text tokens give 3.33 TFLOPs, 13% below it.
    assert llm_prefill_flops(tc, [731] * 32) < 3.82e12 <= llm_prefill_flops(tc, [732] * 32)


# ----- token arithmetic ------------------------------------------------------------------------------
def test_geometry_helpers():
    assert pooled_grid(24, 24, (2, 2)) == (12, 12)
    assert pooled_grid(12, 12, (1, 2)) == (12, 6)
    assert pooled_grid(5, 7, (2, 2)) == (2, 3)  # floor, like max_pool2d
    assert kept_count(576, 0.5) == 288
    assert kept_count(100, 1 - 0.9) == 10  # 9.999999999999998 without the guard
    assert kept_count(403, 0.5) == 201
    with pytest.raises(ValueError, match="kernel"):
        pooled_grid(4, 4, (0, 2))


def test_pyramid_counts_path_421_at_7b(cfg7b):
    vis, txt = analytic_token_counts(cfg7b, 64, [4, 2, 1], "dpn")
    # Layers 0-7 see 24x24 = 576; (2,2) after layer 7 -> 12x12 = 144 for layers 8-15; (1,2) after 15 ->
    # 12x6 = 72 for layers 16-23; keep after 23 -> 72 for layers 24-31.
    assert vis == [576] * 8 + [144] * 8 + [72] * 16
    assert txt == [64] * 32
    # static defaults to the same (4, 2, 1) path.
    assert analytic_token_counts(cfg7b, 64, None, "static") == (vis, txt)
    # "pre" pools the DPE layer's input: layer 7 already sees 144.
    pre = get_preset("llava-1.5-7b", location="pre")
    assert analytic_token_counts(pre, 64, [4, 2, 1], "dpn")[0] == [576] * 7 + [144] * 8 + [72] * 17
    # (4,4,4): 576 -> 144 -> 36 -> 9 (36 >= 16 tokens is still pooled).
    assert analytic_token_counts(cfg7b, 64, [4, 4, 4], "dpn")[0] == [576] * 8 + [144] * 8 + [36] * 8 + [9] * 8
    assert analytic_token_counts(cfg7b, 10, None, "none") == ([576] * 32, [10] * 32)


def test_min_tokens_rule_and_text_only(cfg7b):
    # A 3x5 grid (15 < 16 tokens) is never pooled; a 4x4 grid (16) is: -> 2x2 = 4, then left alone.
    assert analytic_token_counts(cfg7b, 8, [4, 4, 4], "dpn", grid=(3, 5))[0] == [15] * 32
    assert analytic_token_counts(cfg7b, 8, [4, 4, 4], "dpn", grid=(4, 4))[0] == [16] * 8 + [4] * 24
    vis, txt = analytic_token_counts(cfg7b, 30, [4, 2, 1], "dpn", grid=(0, 0))
    assert vis == [0] * 32 and txt == [30] * 32
    report = flops_report(cfg7b, vis, txt)
    assert report["saving"] == 0.0 and report["vision_tflops"] == 0.0 and report["projector_tflops"] == 0.0


def test_fastv_and_pdrop_counts(cfg7b):
    # FastV K=2, R=50%: layers 0-1 see all 576, layers 2-31 keep 288.
    assert analytic_token_counts(cfg7b, 64, None, "fastv")[0] == [576, 576] + [288] * 30
    k3 = get_preset("llava-1.5-7b", fastv_layer=3, fastv_ratio=0.75)
    assert analytic_token_counts(k3, 64, None, "fastv")[0] == [576] * 3 + [144] * 29
    # PDrop at layers 8/16/24 keeping half each time.
    assert analytic_token_counts(cfg7b, 64, None, "pdrop")[0] == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8


def test_bad_paths_name_the_value_and_choices(cfg7b):
    with pytest.raises(ValueError, match=r"\[4, 2\].*3 values.*\[1, 2, 4\]"):
        analytic_token_counts(cfg7b, 64, [4, 2], "dpn")
    with pytest.raises(ValueError, match=r"\[3\].*valid factors are \[1, 2, 4\]"):
        analytic_token_counts(cfg7b, 64, [4, 3, 1], "dpn")
    with pytest.raises(ValueError, match="needs a path"):
        analytic_token_counts(cfg7b, 64, None, "dpn")
    with pytest.raises(ValueError, match="only applies"):
        analytic_token_counts(cfg7b, 64, [4, 2, 1], "fastv")


# ----- the method notes' reading --------------------------------------------------------------------
def test_savings_at_7b_match_method_notes(cfg7b):
    def saving(path):
        return flops_report(cfg7b, *analytic_token_counts(cfg7b, 64, path, "dpn"))["saving"]

    # (4,2,1) by hand: 8 layers at n=640 (104,018,739,200 each), 8 at n=208 (13,958,643,712 +
    # 354,418,688 + 18,756,927,488 = 33,069,989,888), 16 at n=136 (9,126,805,504 + 151,519,232 +
    # 12,264,144,896 = 21,542,469,632): 1,441,389,346,816 of 3,328,599,654,400 -> saves 56.70%.
    assert saving([4, 2, 1]) == pytest.approx(1 - 1_441_389_346_816 / 3_328_599_654_400, abs=1e-12)
    assert saving([4, 2, 1]) == pytest.approx(0.5670, abs=5e-4)  # notes: ~57%
    assert saving([2, 2, 2]) == pytest.approx(0.4832, abs=5e-4)  # notes: ~48%
    all_paths = {p: saving(list(p)) for p in itertools.product([1, 2, 4], repeat=3)}
    best = max(all_paths, key=all_paths.get)
    # Notes: "no path saves more than ~63%" -- the most is (4,4,4) at 60.5%, since layers 0-7 always
    # see all 576 visual tokens and the 64 text tokens are never pooled.
    assert best == (4, 4, 4) and all_paths[best] == pytest.approx(0.6048, abs=5e-4) and all_paths[best] < 0.63
    assert all_paths[(1, 1, 1)] == 0.0
    # PDrop's 576 -> 288 -> 144 -> 72 schedule is the same token count as path (2,2,2).
    pdrop = flops_report(cfg7b, *analytic_token_counts(cfg7b, 64, None, "pdrop"))["saving"]
    assert pdrop == pytest.approx(saving([2, 2, 2]), abs=1e-12)


def test_flops_report_and_per_sample_tflops(cfg7b):
    vis, txt = analytic_token_counts(cfg7b, 64, [4, 2, 1], "dpn")
    r = flops_report(cfg7b, vis, txt)
    assert r["baseline_tflops"] == pytest.approx(3.3285996544)
    assert r["baseline_tflops_exact"] == pytest.approx(32 * 265_751_101_440 / 1e12)
    assert 0.5 < r["saving_exact"] < r["saving"]  # the exact count weights the untouched attention more
    # CLIP ViT-L/14-336 up to layer -2 (23 of 24 layers): embed 2*576*588*1024 + 23 * per-layer on 577 tokens.
    per_layer = 8 * 577 * 1024**2 + 4 * 577**2 * 1024 + 4 * 577 * 1024 * 4096
    assert r["vision_tflops"] == pytest.approx((2 * 576 * 588 * 1024 + 23 * per_layer) / 1e12)
    assert r["projector_tflops"] == pytest.approx((2 * 576 * 1024 * 4096 + 2 * 576 * 4096**2) / 1e12)
    assert r["lm_head_tflops"] == pytest.approx(2 * 4096 * 32064 / 1e12)

    vis_b = torch.tensor([vis, [0] * 32])
    txt_b = torch.tensor([txt, [40] * 32])
    out = per_sample_tflops(cfg7b.text_config, vis_b, txt_b)
    assert out[0] == pytest.approx(r["tflops"])
    assert out[1] == pytest.approx(32 * llm_layer_flops(40, cfg7b.text_config) / 1e12)


# ----- the DPN model under the flop counter ------------------------------------------------------------
@pytest.mark.parametrize("compressor,force", [("none", None), ("static", None), ("dpn", [4, 2, 1])])
def test_model_flops_match_counter(compressor, force):
    from dpn.modeling_dpn import DPNForConditionalGeneration

    cfg = test_tiny(compressor=compressor)
    torch.manual_seed(0)
    model = DPNForConditionalGeneration(cfg).eval()
    n_text = 7
    ids = torch.tensor([[1, 5, 6] + [cfg.image_token_id] * cfg.num_image_tokens + [7, 8, 9, 10]])
    kwargs = {}
    if force is not None:
        kwargs["force_path"] = torch.tensor([[cfg.expert_index(f) for f in force]])
    with flop_counter_mode() as fc, torch.no_grad():
        out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 16, 16), **kwargs)
    vis = out.visual_tokens_per_layer[0].tolist()
    txt = out.text_tokens_per_layer[0].tolist()
    path = force if compressor == "dpn" else None
    assert (vis, txt) == analytic_token_counts(cfg, n_text, path, compressor)
    if compressor != "none":
        assert vis == [64, 16, 8, 8]  # 8x8 -(2,2)-> 4x4 -(1,2)-> 4x2 -keep-> 4x2

    counts = fc.get_flop_counts()
    prefix = "DPNForConditionalGeneration"
    measured = _layer_flops(counts, f"{prefix}.language_model.model.layers", cfg.text_config.num_hidden_layers)
    assert measured == [llm_layer_flops(v + t, cfg.text_config, "exact") for v, t in zip(vis, txt, strict=True)]
    # The HF CLIP forward runs all layers, also the one after the -2 features LLaVA reads.
    assert sum(counts[f"{prefix}.vision_tower"].values()) == vision_tower_flops(cfg.vision_config, None)
    assert sum(counts[f"{prefix}.multi_modal_projector"].values()) == projector_flops(cfg)
    assert sum(counts[f"{prefix}.language_model.lm_head"].values()) == lm_head_flops(cfg.text_config, vis[-1] + n_text)


def test_model_counts_mixed_batch():
    from dpn.modeling_dpn import DPNForConditionalGeneration

    cfg = test_tiny(compressor="static")
    torch.manual_seed(0)
    model = DPNForConditionalGeneration(cfg).eval()
    img = [1, 5, 6] + [cfg.image_token_id] * cfg.num_image_tokens + [7, 8, 9, 10]
    txt_only = [1, 5, 6, 7, 8] + [cfg.text_config.pad_token_id] * (len(img) - 5)
    ids = torch.tensor([img, txt_only])
    mask = torch.tensor([[1] * len(img), [1] * 5 + [0] * (len(img) - 5)])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(1, 3, 16, 16))
    assert out.visual_tokens_per_layer.tolist() == [
        analytic_token_counts(cfg, 7, None, "static")[0],
        analytic_token_counts(cfg, 5, None, "static", grid=(0, 0))[0],
    ]
    assert out.text_tokens_per_layer.tolist() == [[7] * 4, [5] * 4]
    tf = per_sample_tflops(cfg.text_config, out.visual_tokens_per_layer, out.text_tokens_per_layer)
    assert tf[1] == pytest.approx(4 * llm_layer_flops(5, cfg.text_config) / 1e12)


# ----- CLI -------------------------------------------------------------------------------------------
def _cli(capsys, *argv) -> tuple[int, dict | None, str]:
    rc = cli_main(["flops", *argv])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return rc, (json.loads(lines[-1]) if rc == 0 else None), captured.err


def test_cli_dpn_path(capsys):
    rc, out, _ = _cli(capsys, "--preset", "llava-1.5-7b", "--compressor", "dpn", "--path", "4,2,1", "--text-tokens", "64")
    assert rc == 0
    assert out["path"] == [4, 2, 1] and out["compressor"] == "dpn"
    assert out["baseline_tflops"] == pytest.approx(3.3285996544)
    assert out["tflops"] == pytest.approx(1.441389346816)
    assert out["saving"] == pytest.approx(0.56697, abs=1e-5)
    assert out["visual_tokens_per_layer"] == [576] * 8 + [144] * 8 + [72] * 16
    assert out["text_tokens_per_layer"] == [64] * 32


@pytest.mark.parametrize(
    "compressor,expected_visual",
    [("none", [576] * 32), ("static", [576] * 8 + [144] * 8 + [72] * 16), ("fastv", [576] * 2 + [288] * 30)],
)
def test_cli_other_compressors(capsys, compressor, expected_visual):
    rc, out, _ = _cli(capsys, "--compressor", compressor, "--text-tokens", "64")
    assert rc == 0 and out["visual_tokens_per_layer"] == expected_visual
    assert (out["saving"] == 0.0) == (compressor == "none")


def test_cli_config_file_and_dir(capsys, tmp_path):
    test_tiny(compressor="static", static_path=[2, 2, 1]).save_pretrained(tmp_path)
    for target in (tmp_path, tmp_path / "config.json"):
        rc, out, _ = _cli(capsys, "--config", str(target), "--text-tokens", "10")
        assert rc == 0
        # 8x8 -(1,2) after layer 0-> 8x4 -(1,2) after layer 1-> 8x2, kept.
        assert out["compressor"] == "static" and out["visual_tokens_per_layer"] == [64, 32, 16, 16]
        assert out["text_tokens_per_layer"] == [10] * 4
    rc, out, _ = _cli(capsys, "--config", str(tmp_path), "--compressor", "pdrop")
    assert rc == 0 and out["visual_tokens_per_layer"] == [64, 32, 16, 8]  # pdrop layers 1/2/3 of 4


@pytest.mark.parametrize(
    "path,needle",
    [("4,2", "[4, 2]"), ("4,3,1", "[3]"), ("4,x,1", "4,x,1")],
)
def test_cli_bad_path_exits_2(capsys, path, needle):
    rc, _, err = _cli(capsys, "--compressor", "dpn", "--path", path)
    assert rc == 2
    assert needle in err
    if path != "4,x,1":
        assert "[1, 2, 4]" in err


def test_cli_bad_config_exits_2(capsys, tmp_path):
    rc, _, err = _cli(capsys, "--config", str(tmp_path / "missing"))
    assert rc == 2 and "missing" in err


def test_cli_no_arguments_prices_the_default_path_and_the_baseline(capsys):
    """`dpn flops` alone: preset llava-1.5-7b, its compressor (dpn) on the default pyramid path (4, 2, 1),
    and the uncompressed baseline, which is exactly what `--compressor none` prices."""
    rc, out, _ = _cli(capsys)
    assert rc == 0
    assert out["config"] == "llava-1.5-7b" and out["compressor"] == "dpn" and out["text_tokens"] == 64
    assert out["path"] == [4, 2, 1] and out["path_source"] == "default"
    assert out["visual_tokens_per_layer"] == [576] * 8 + [144] * 8 + [72] * 16
    # Same numbers as the explicit path (test_cli_dpn_path): ~57% saving, the method notes' figure.
    assert out["tflops"] == pytest.approx(1.441389346816) and out["saving"] == pytest.approx(0.56697, abs=1e-5)
    assert out["baseline_compressor"] == "none"
    rc, none, _ = _cli(capsys, "--compressor", "none")
    assert rc == 0 and none["path"] is None and none["path_source"] is None
    assert out["baseline_tflops"] == pytest.approx(none["tflops"]) == pytest.approx(3.3285996544)
    assert out["baseline_tflops_exact"] == pytest.approx(none["tflops_exact"])
    assert out["baseline_visual_tokens_per_layer"] == none["visual_tokens_per_layer"] == [576] * 32
    rc, given, _ = _cli(capsys, "--path", "2,2,2")
    assert rc == 0 and given["path"] == [2, 2, 2] and given["path_source"] == "given"


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--preset", "llava-9b"], "'llava-9b'"),
        (["--compressor", "zip"], "'zip'"),
        (["--text-tokens", "-5"], "-5"),
        (["--compressor", "fastv", "--path", "4,2,1"], "'fastv'"),
        (["--path", "4,2,1,1"], "[4, 2, 1, 1]"),
    ],
)
def test_cli_bad_arguments_exit_2_naming_the_value(capsys, argv, needle):
    rc, _, err = _cli(capsys, *argv)
    assert rc == 2
    assert err.startswith("dpn flops: error: ") and needle in err and "Traceback" not in err


@pytest.mark.parametrize("argv,needle", [(["--text-tokens", "abc"], "'abc'"), (["--preset", "x", "--config", "y"],
                                                                                  "not allowed with")])
def test_cli_unparseable_arguments_exit_2(capsys, argv, needle):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["flops", *argv])
    assert exit_info.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.parametrize("content", ["[1, 2]", "{bad json", '{"compressor": "zip"}', '{"text_config": 5}'])
def test_cli_broken_config_file_exits_2_naming_it(capsys, tmp_path, content):
    (tmp_path / "config.json").write_text(content)
    rc, _, err = _cli(capsys, "--config", str(tmp_path))
    assert rc == 2 and f"--config {tmp_path / 'config.json'}: not a valid DPNConfig config.json" in err
