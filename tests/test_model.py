"""DPN model: LLaVA equivalence, per-sample pyramid, router training signal, loading and saving."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionModel, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

from dpn.configuration_dpn import DPNConfig, default_dpe_layers
from dpn.constants import IGNORE_INDEX
from dpn.loading import from_components, from_llava_hf
from dpn.modeling_dpn import DPNForConditionalGeneration
from dpn.presets import test_tiny
from dpn.pyramid import routing_loss

IMG, ROUTER, PAD = 60, 61, 0
N_IMG = test_tiny().num_image_tokens  # 8 x 8 = 64


def image_prompt(prefix, suffix):
    return list(prefix) + [IMG] * N_IMG + list(suffix)


def pad_batch(seqs, left=False):
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), PAD)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(L - len(s), L) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids, mask


def real_logits(out, b):
    return out.logits[b][out.attention_mask[b]]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    torch.manual_seed(0)
    c = test_tiny()
    cfg = LlavaConfig(vision_config=c.vision_config, text_config=c.text_config, image_token_id=IMG)
    hf = LlavaForConditionalGeneration(cfg).eval()
    d = tmp_path_factory.mktemp("llava-hf")
    hf.save_pretrained(d)
    return d, hf


def test_compressor_none_matches_hf_llava(llava_dir):
    d, hf = llava_dir
    model = from_llava_hf(d, compressor="none")
    ids = torch.tensor([image_prompt([1, 5, 6], [7, 8, 9, 10]), image_prompt([1, 9, 9], [17, 18, 19, 20])])
    px = torch.randn(2, 3, 16, 16)
    labels = ids.masked_fill(ids == IMG, IGNORE_INDEX)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px, labels=labels)
        out = model(ids, pixel_values=px, labels=labels)
    assert (ref.logits - out.logits).abs().max().item() < 1e-4
    assert abs(ref.loss.item() - out.loss.item()) < 1e-5
    assert out.visual_tokens_per_layer.tolist() == [[N_IMG] * 4] * 2


def test_llava_hf_hub_key_layout_loads(llava_dir, tmp_path):
    """Published llava-hf checkpoints keep CLIP under `vision_tower.vision_model.`: both layouts load."""
    d, hf = llava_dir
    state = load_file(d / "model.safetensors")
    renamed = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in state.items()}
    save_file(renamed, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    model = from_llava_hf(tmp_path, compressor="dpn")
    ref = hf.model.vision_tower.embeddings.patch_embedding.weight
    assert torch.equal(model.vision_tower.embeddings.patch_embedding.weight, ref)
    assert model.config.compressor == "dpn" and len(model.routers) == 3


def test_loading_errors_name_file_and_key(llava_dir, tmp_path):
    d, _ = llava_dir
    with pytest.raises(FileNotFoundError, match="not one"):
        from_llava_hf(tmp_path / "nope")
    state = load_file(d / "model.safetensors")
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    bad = dict(state)
    bad["multi_modal_projector.linear_1.weight"] = torch.zeros(3, 3)
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: weight 'multi_modal_projector\.linear_1\.weight' has shape"):
        from_llava_hf(tmp_path)
    missing = {k: v for k, v in state.items() if k != "language_model.model.norm.weight"}
    save_file(missing, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="language_model.model.norm.weight"):
        from_llava_hf(tmp_path)
    extra = dict(state)
    extra["language_model.model.bogus.weight"] = torch.zeros(2)
    save_file(extra, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="bogus"):
        from_llava_hf(tmp_path)


def test_from_components_with_llava_stage1_projector(tmp_path):
    torch.manual_seed(1)
    c = test_tiny()
    llm = LlamaForCausalLM(c.text_config).eval()
    vision = CLIPVisionModel(c.vision_config).eval()
    llm.save_pretrained(tmp_path / "llm")
    vision.save_pretrained(tmp_path / "clip")
    # LLaVA's stage-1 output: model.mm_projector.{0,2} = Linear(d_vis, d), GELU, Linear(d, d).
    dv, dt = c.vision_config.hidden_size, c.text_config.hidden_size
    proj = {
        "model.mm_projector.0.weight": torch.randn(dt, dv), "model.mm_projector.0.bias": torch.randn(dt),
        "model.mm_projector.2.weight": torch.randn(dt, dt), "model.mm_projector.2.bias": torch.randn(dt),
    }
    (tmp_path / "proj").mkdir()
    torch.save(proj, tmp_path / "proj" / "mm_projector.bin")
    model = from_components(tmp_path / "llm", tmp_path / "clip", tmp_path / "proj", image_token_id=IMG, compressor="none")
    assert torch.equal(model.multi_modal_projector.linear_2.weight, proj["model.mm_projector.2.weight"])
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, llm(ids).logits, atol=1e-5)
    px = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.vision_tower(px).last_hidden_state, vision(px).last_hidden_state)


def test_static_all_keep_equals_none():
    torch.manual_seed(0)
    none = DPNForConditionalGeneration(test_tiny(compressor="none")).eval()
    static = DPNForConditionalGeneration(test_tiny(compressor="static", static_path=[1, 1, 1])).eval()
    static.load_state_dict(none.state_dict(), strict=False)
    ids, mask = pad_batch([image_prompt([1, 5], [7, 8, 9]), [1, 4, 5, 6]])
    px = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        a, b = none(ids, pixel_values=px, attention_mask=mask), static(ids, pixel_values=px, attention_mask=mask)
    for i in range(2):
        assert torch.allclose(real_logits(a, i), real_logits(b, i), atol=1e-6)


@pytest.mark.parametrize("left", [False, True])
def test_mixed_batch_equals_each_sample_alone(left):
    """Text-only + two samples on different routing paths + padding: each sample as if alone."""
    torch.manual_seed(0)
    model = DPNForConditionalGeneration(test_tiny(compressor="dpn", router_token_id=ROUTER)).eval()
    seqs = [
        image_prompt([1, 5, 6], [7, 8, ROUTER, 9, 10]),
        [1, 4, 5, 6, 7, 8, 9],
        image_prompt([1, 9], [17, 18, 19, 20, 21, 22, ROUTER]),
    ]
    paths = torch.tensor([[2, 1, 0], [0, 0, 0], [1, 1, 1]])  # quarter-then-half vs half-half-half
    px = torch.randn(2, 3, 16, 16)
    ids, mask = pad_batch(seqs, left=left)
    with torch.no_grad():
        batch = model(ids, pixel_values=px, attention_mask=mask, force_path=paths)
    # 8x8 -(2,2)-> 4x4 -(1,2)-> 4x2; the last DPE sees 8 < 16 tokens, so that sample is not pooled (-1).
    assert batch.routing_paths.tolist() == [[2, 1, -1], [-1, -1, -1], [1, 1, 1]]
    assert batch.visual_tokens_per_layer[0].tolist() == [64, 16, 8, 8]
    assert batch.visual_tokens_per_layer[2].tolist() == [64, 32, 16, 8]
    assert batch.visual_tokens_per_layer[1].tolist() == [0, 0, 0, 0]
    assert batch.text_tokens_per_layer[:, 0].tolist() == [8, 7, 9]
    img_i = {0: 0, 2: 1}
    for b, s in enumerate(seqs):
        px_b = px[img_i[b] : img_i[b] + 1] if b in img_i else None
        with torch.no_grad():
            alone = model(torch.tensor([s]), pixel_values=px_b, force_path=paths[b : b + 1])
        assert alone.routing_paths[0].tolist() == batch.routing_paths[b].tolist()
        assert torch.allclose(real_logits(batch, b), alone.logits[0], atol=1e-5), b
        assert torch.allclose(batch.routing_probs[b], alone.routing_probs[0], atol=1e-6)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("keep", [0, 1, 3])
def test_batch_on_different_paths_equals_each_alone_for_every_padding(padding, keep):
    """Samples on different forced paths (and a text-only one), with no padding, left or right padding:
    each sample's real-token logits -- all of them, or the last `keep` (`logits_to_keep`) -- equal its run
    alone. With no padding the re-padded batch used to be padded on the right, so the last position of a
    pooled sample was padding."""
    torch.manual_seed(0)
    model = DPNForConditionalGeneration(test_tiny(compressor="dpn", router_token_id=ROUTER)).eval()
    seqs = [image_prompt([1, 5, 6], [7, 8, ROUTER]), image_prompt([1, 9, 4], [17, 18, ROUTER]), [1, 4, 5, 6, 7]]
    if padding == "none":
        seqs = seqs[:2]
    else:
        seqs[1] = seqs[1] + [19, 20]  # longer than the others: padding on `padding`'s side
    paths = torch.tensor([[2, 1, 0], [0, 0, 0], [0, 0, 0]])[: len(seqs)]
    px = torch.randn(2, 3, 16, 16)
    ids, mask = pad_batch(seqs, left=padding == "left")
    with torch.no_grad():
        batch = model(ids, pixel_values=px, attention_mask=mask, force_path=paths, logits_to_keep=keep)
        for b, s in enumerate(seqs):
            px_b = px[b : b + 1] if b < 2 else None
            alone = model(torch.tensor([s]), pixel_values=px_b, force_path=paths[b : b + 1], logits_to_keep=keep)
            want = alone.logits[0]
            got = batch.logits[b][batch.attention_mask[b]]
            assert got.shape == want.shape, (b, got.shape, want.shape)
            assert torch.allclose(got, want, atol=1e-5), b
            if keep:
                assert torch.allclose(batch.logits[b, -1], want[-1], atol=1e-5), b  # what generation reads
    assert batch.visual_tokens_per_layer[0, -1] < batch.visual_tokens_per_layer[1, -1]


def test_padding_that_is_not_on_one_side_is_refused():
    model = DPNForConditionalGeneration(test_tiny(compressor="none")).eval()
    ids = torch.tensor([[1, 5, 6, 7], [1, 5, 6, 7]])
    for mask, match in (
        ([[1, 0, 1, 1], [1, 1, 1, 1]], "between real tokens"),
        ([[0, 1, 1, 0], [1, 1, 1, 1]], "both sides"),
        ([[0, 1, 1, 1], [1, 1, 1, 0]], "mixes"),
    ):
        with pytest.raises(ValueError, match=match):
            model(ids, attention_mask=torch.tensor(mask))


def test_router_choice_per_sample_matches_alone():
    """Without forced paths, each sample's own router decides, independent of its batch mates."""
    torch.manual_seed(3)
    model = DPNForConditionalGeneration(test_tiny(compressor="dpn", router_token_id=ROUTER)).eval()
    seqs = [image_prompt([1, k], [7, k + 2, ROUTER]) for k in range(3, 9)]
    px = torch.randn(len(seqs), 3, 16, 16)
    ids, mask = pad_batch(seqs)
    with torch.no_grad():
        # Opinionated routers: inputs standardised over these samples (as dpn.routing.fit_routers does), a
        # large last layer. Only the first DPE's inputs are fixed before routing, so standardise that one.
        x = model(ids, pixel_values=px, attention_mask=mask, output_router_inputs=True).router_inputs[:, 0]
        for r in model.routers.values():
            r.input_shift.copy_(x.mean(0))
            r.input_scale.copy_(1 / x.std(0).clamp(min=1e-6))
            torch.nn.init.normal_(r.fc2.weight, std=5.0)
        batch = model(ids, pixel_values=px, attention_mask=mask)
        for b, s in enumerate(seqs):
            alone = model(torch.tensor([s]), pixel_values=px[b : b + 1])
            assert alone.routing_paths[0].tolist() == batch.routing_paths[b].tolist()
            assert torch.allclose(real_logits(batch, b), alone.logits[0], atol=1e-5)
    assert len({tuple(p) for p in batch.routing_paths.tolist()}) > 1, "routers should disagree across samples"


def test_router_gets_gradients_from_lm_loss_alone():
    torch.manual_seed(0)
    model = DPNForConditionalGeneration(test_tiny(compressor="dpn", router_token_id=ROUTER, route_loss_coef=0.0)).train()
    ids = torch.tensor([image_prompt([1, 5, 6], [7, ROUTER, 8, 9, 10])] * 2)
    labels = ids.masked_fill(ids == IMG, IGNORE_INDEX)
    out = model(ids, pixel_values=torch.randn(2, 3, 16, 16), labels=labels)
    out.loss.backward()
    routed = {i for i, j in enumerate(out.routing_paths[0].tolist()) if j >= 0}
    assert routed, "at least one DPE must have pooled"
    for k, layer in enumerate(model.config.dpe_layers):
        g = model.routers[str(layer)].fc2.weight.grad
        if k in routed:
            assert g is not None and g.abs().sum() > 0, f"router {layer} got no LM gradient"


def test_routing_loss_hand_computed():
    scores = torch.tensor([0.0, 1.0, 2.0])
    # argmax 2 (s=2, p=.5 -> 1.0), argmax 0 (s=0 -> 0.0), argmax 1 (s=1, p=.7 -> .7): mean .5667
    probs = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [0.1, 0.7, 0.2]])
    assert routing_loss(probs, scores, 1.5).item() == pytest.approx(1.5 - (1.0 + 0.0 + 0.7) / 3)
    confident = torch.tensor([[0.0, 0.0, 1.0]])
    assert routing_loss(confident, scores, 1.5).item() == 0.0  # 2.0 > target: hinge at zero


def test_total_loss_is_lm_plus_weighted_route_loss():
    torch.manual_seed(0)
    model = DPNForConditionalGeneration(test_tiny(compressor="dpn", router_token_id=ROUTER, route_loss_coef=0.5)).eval()
    ids = torch.tensor([image_prompt([1, 5, 6], [7, ROUTER, 8, 9, 10])])
    labels = ids.masked_fill(ids == IMG, IGNORE_INDEX)
    out = model(ids, pixel_values=torch.randn(1, 3, 16, 16), labels=labels)
    probs = out.routing_probs[0][out.routing_paths[0] >= 0]
    expected_route = routing_loss(probs, torch.tensor([0.0, 1.0, 2.0]), 1.5)
    assert out.route_loss.item() == pytest.approx(expected_route.item(), abs=1e-6)
    assert out.loss.item() == pytest.approx(out.lm_loss.item() + 0.5 * expected_route.item(), abs=1e-6)


def test_labels_in_original_layout_give_the_right_loss():
    """After pooling, every supervised token is still predicted from the position before it."""
    torch.manual_seed(0)
    model = DPNForConditionalGeneration(test_tiny(compressor="static", static_path=[4, 2, 1])).eval()
    prefix, suffix = [1, 5, 6], [7, 8, 9, 10, 11, 12]
    ids = torch.tensor([image_prompt(prefix, suffix)])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, -4:] = ids[0, -4:]  # the last four tokens are the answer
    with torch.no_grad():
        out = model(ids, pixel_values=torch.randn(1, 3, 16, 16), labels=labels)
    n_vis = int(out.visual_tokens_per_layer[0, -1])  # 8 after (2,2) then (1,2)
    assert n_vis == 8 and out.logits.shape[1] == len(prefix) + n_vis + len(suffix)
    # suffix token t (0-based) sits at len(prefix) + n_vis + t in the final layout.
    start = len(prefix) + n_vis
    pred_pos = [start + t - 1 for t in range(len(suffix) - 4, len(suffix))]
    manual = F.cross_entropy(out.logits[0, pred_pos], ids[0, -4:])
    assert out.lm_loss.item() == pytest.approx(manual.item(), abs=1e-5)
    assert int(out.num_label_tokens) == 4


@pytest.mark.parametrize("location,expected", [("post", [64, 16, 8, 8]), ("pre", [16, 8, 8, 8])])
def test_per_layer_counts_follow_location(location, expected):
    model = DPNForConditionalGeneration(test_tiny(compressor="static", static_path=[4, 2, 1], location=location)).eval()
    with torch.no_grad():
        out = model(torch.tensor([image_prompt([1], [2])]), pixel_values=torch.randn(1, 3, 16, 16))
    assert out.visual_tokens_per_layer[0].tolist() == expected


def test_training_sampling_never_leaves_too_few_tokens():
    torch.manual_seed(0)
    model = DPNForConditionalGeneration(test_tiny(compressor="dpn", min_tokens_after_pool=18)).train()
    ids = torch.tensor([image_prompt([1, 5], [7, 8])] * 16)
    seen = set()
    for _ in range(5):
        out = model(ids, pixel_values=torch.randn(16, 3, 16, 16))
        # after every DPE a pooled sample keeps >= 18 visual tokens (64 -> 32 or 16 would break it)
        counts = out.visual_tokens_per_layer
        for b in range(16):
            for i in range(1, 4):
                if counts[b, i] < counts[b, i - 1]:
                    assert counts[b, i] >= 18
        seen |= {tuple(p) for p in out.routing_paths.tolist()}
    assert len(seen) > 1, "training must sample paths, not take the argmax"


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DPNForConditionalGeneration(test_tiny(compressor="dpn", router_token_id=ROUTER, pool="conv")).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["compressor"] == "dpn"
    again = DPNForConditionalGeneration.from_pretrained(tmp_path).eval()
    def essential(cfg):
        d = cfg.to_dict()
        d.pop("_name_or_path", None)
        for sub in ("text_config", "vision_config"):
            d[sub].pop("dtype", None)
        return d

    assert essential(again.config) == essential(model.config)
    ids = torch.tensor([image_prompt([1, 5, 6], [7, ROUTER])])
    px = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        a, b = model(ids, pixel_values=px), again(ids, pixel_values=px)
    assert torch.equal(a.logits, b.logits) and a.routing_paths.tolist() == b.routing_paths.tolist()


def test_conv_pool_starts_as_average_pool():
    model = DPNForConditionalGeneration(test_tiny(compressor="static", pool="conv", static_path=[4, 1, 1])).eval()
    pool = model.pool_experts["0"]
    x = torch.randn(64, 32)
    conv_out, h, w = pool(x, 8, 8, 2)
    ref = F.avg_pool2d(x.t().reshape(1, 32, 8, 8), 2).reshape(32, 16).t()
    assert (h, w) == (4, 4) and torch.allclose(conv_out, ref, atol=1e-6)


def test_bad_inputs_are_named():
    model = DPNForConditionalGeneration(test_tiny(compressor="dpn")).eval()
    with pytest.raises(ValueError, match="sample 0 holds 3 image tokens"):
        model(torch.tensor([[1, IMG, IMG, IMG, 5]]), pixel_values=torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="got 0 images"):
        model(torch.tensor([image_prompt([1], [2])]))
    with pytest.raises(ValueError, match="compressor must be one of"):
        test_tiny(compressor="pyramid")
    with pytest.raises(ValueError, match="static_path factors"):
        test_tiny(compressor="static", static_path=[3, 1, 1])
    with pytest.raises(ValueError, match="dpe_layers must lie in"):
        test_tiny(dpe_layers=[1, 2, 9])


def test_default_dpe_layers_end_each_quarter():
    from dpn.presets import llava_1_5_7b, tiny

    assert llava_1_5_7b().dpe_layers == [7, 15, 23]
    assert tiny().dpe_layers == [0, 1, 2]
    assert default_dpe_layers(8) == [1, 3, 5]
    assert isinstance(llava_1_5_7b(), DPNConfig)


def test_loss_without_logits_equals_the_full_forward_and_grads_match():
    """return_logits=False runs the LM head on supervised positions only: same loss, per-sample losses
    and gradients as the full forward."""
    torch.manual_seed(0)
    model = DPNForConditionalGeneration(test_tiny(compressor="dpn", router_token_id=ROUTER)).train()
    ids, mask = pad_batch([image_prompt([1, 5], [7, ROUTER, 9, 10, 11]), image_prompt([1, 9, 4], [17, ROUTER, 18])])
    labels = ids.masked_fill(ids == IMG, IGNORE_INDEX).masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :4] = IGNORE_INDEX
    px = torch.randn(2, 3, 16, 16)
    force = torch.tensor([[2, 1, 0], [0, 1, 1]])
    outs, grads = [], []
    for full in (True, False):
        model.zero_grad()
        out = model(ids, pixel_values=px, attention_mask=mask, labels=labels, force_path=force, return_logits=full)
        out.loss.backward()
        outs.append(out)
        grads.append(model.language_model.lm_head.weight.grad.clone())
    assert outs[1].logits is None
    assert torch.allclose(outs[0].loss, outs[1].loss, atol=1e-6)
    assert torch.allclose(outs[0].sample_loss, outs[1].sample_loss, atol=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    model.eval()
    with torch.no_grad():
        for b in range(2):
            real = mask[b].bool()
            alone = model(ids[b : b + 1, real], pixel_values=px[b : b + 1], labels=labels[b : b + 1, real],
                          force_path=force[b : b + 1])
            assert torch.allclose(alone.lm_loss, outs[0].sample_loss[b], atol=1e-5), b


@pytest.mark.parametrize("objective", ["reference", "counterfactual"])
def test_text_only_batch_trains_without_logits(objective):
    """A text-only micro-batch routes nothing: the routing loss is 0 and the loss-only forward still works."""
    torch.manual_seed(0)
    model = DPNForConditionalGeneration(test_tiny(compressor="dpn", router_token_id=ROUTER,
                                                  router_objective=objective)).train()
    ids = torch.tensor([[1, 4, 5, 6, 7, 8], [1, 9, 10, 11, 12, 13]])
    out = model(ids, labels=ids, return_logits=False)
    out.loss.backward()
    assert out.logits is None and torch.isfinite(out.loss)
    assert (out.route_loss is None) == (objective == "counterfactual")


def test_loading_is_quiet_but_says_llava_hf_routers_start_untrained(llava_dir, tmp_path, capfd, caplog):
    """Our checkpoints load with nothing on stderr and no warning (no "model of type" warning, no load report,
    no progress bar), with or without the routers they were saved with; a llava-hf checkpoint loaded as dpn
    says in one line that the routers start untrained."""
    import logging

    from dpn.inference import load_model

    d, _ = llava_dir
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        model = from_llava_hf(d, compressor="dpn")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "3 routers start untrained" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    assert capfd.readouterr().err == ""

    model.save_pretrained(tmp_path / "ours")
    caplog.clear()
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        load_model(tmp_path / "ours", "dpn")
        load_model(tmp_path / "ours", "static")  # routers saved, not built: no UNEXPECTED report
        DPNConfig.from_pretrained(tmp_path / "ours")
        from transformers import AutoConfig

        assert type(AutoConfig.from_pretrained(tmp_path / "ours")) is DPNConfig
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
