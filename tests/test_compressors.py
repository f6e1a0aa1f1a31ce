"""FastV and PyramidDrop: the ranking against HF's eager attention weights, which tokens survive, token
counts against their definitions and `dpn.flops`, training, padding, and FLOPs under torch's counter."""

from __future__ import annotations

import pytest
import torch

from dpn.constants import IGNORE_INDEX
from dpn.flops import (
    analytic_token_counts,
    flop_counter_mode,
    llm_layer_flops,
    lm_head_flops,
    projector_flops,
    vision_tower_flops,
)
from dpn.modeling_dpn import DPNForConditionalGeneration, build_attention_mask
from dpn.presets import test_tiny
from dpn.pruning import query_attention, query_weights, ranking_flops

IMG, PAD = 60, 0
N_IMG = test_tiny().num_image_tokens  # 8 x 8 = 64


def image_prompt(prefix, suffix):
    return list(prefix) + [IMG] * N_IMG + list(suffix)


def make_model(compressor, attn="sdpa", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = test_tiny(compressor=compressor, **kw)
    model = DPNForConditionalGeneration(cfg).eval()
    model.language_model.set_attn_implementation(attn)
    return model


def rope(model, hidden, mask):
    return model.decoder.rotary_emb(hidden, position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0))


def eager_weights(model, i, hidden, mask=None):
    """HF's own eager attention probabilities (B, H, L, L) of decoder layer `i` on its input `hidden`."""
    layer = model.decoder.layers[i]
    assert layer.self_attn.config._attn_implementation == "eager"
    mask = torch.ones(hidden.shape[:2], dtype=torch.bool) if mask is None else mask
    return layer.self_attn(
        hidden_states=layer.input_layernorm(hidden),
        position_embeddings=rope(model, hidden, mask),
        attention_mask=build_attention_mask(mask, mask.shape[1], hidden.dtype),
    )[1]


# ----- the ranking itself ------------------------------------------------------------------------------
def test_query_weights_pick_the_last_prompt_token():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]])
    # no labels: the last real token (left and right padding)
    assert query_weights(mask).nonzero().tolist() == [[0, 7], [1, 5]]
    # labels: the token before each supervised span (two turns in sample 0: positions 3 and 6)
    labels = torch.full((2, 8), IGNORE_INDEX)
    labels[0, 4:6] = 9
    labels[0, 7] = 9
    labels[1, 3:6] = 9
    w = query_weights(mask, labels)
    assert w[0].tolist() == [0, 0, 0, 0.5, 0, 0, 0.5, 0] and w[1].tolist() == [0, 0, 1, 0, 0, 0, 0, 0]
    # a pinned position (generation) wins over everything
    assert query_weights(mask, labels, torch.tensor([4, 2])).nonzero().tolist() == [[0, 4], [1, 2]]


def test_query_attention_equals_hf_eager_weights():
    """GQA (4 query heads, 2 KV heads), left padding, a query in the middle (causal) and two queries."""
    model = make_model("none", attn="eager")
    layer = model.decoder.layers[1]
    torch.manual_seed(1)
    hidden = torch.randn(2, 9, 32)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :3] = False
    with torch.no_grad():
        ref = eager_weights(model, 1, hidden, mask).float()  # (2, 4, 9, 9)
    for t in (8, 5):
        w = torch.zeros(2, 9)
        w[:, t] = 1.0
        got = query_attention(layer, hidden, mask, rope(model, hidden, mask), w)
        assert torch.allclose(got, ref[:, :, t].mean(1), atol=1e-6), t
        assert got[:, t + 1 :].abs().sum() == 0  # keys after the query are never attended
    assert got[1, :3].abs().sum() == 0 and got[:, 5].sum() > 0  # nor padding
    w = torch.zeros(2, 9)
    w[:, 8], w[:, 6] = 0.25, 0.75
    got = query_attention(layer, hidden, mask, rope(model, hidden, mask), w)
    assert torch.allclose(got, 0.25 * ref[:, :, 8].mean(1) + 0.75 * ref[:, :, 6].mean(1), atol=1e-6)


class Capture:
    """Inputs and outputs of decoder layers during one forward."""

    def __init__(self, layers):
        self.inputs, self.outputs, self.handles = {}, {}, []
        for i, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._post(i)))

    def _pre(self, i):
        def hook(module, args, kwargs):
            self.inputs[i] = args[0].detach().clone()
        return hook

    def _post(self, i):
        def hook(module, args, out):
            self.outputs[i] = out.detach().clone()
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def expected_kept(model, i, hidden, start, n, keep):
    """Top `keep` of the visual span [start, start+n) by the last token's eager head-mean attention in
    layer `i` run on `hidden` (1, L, d)."""
    row = eager_weights(model, i, hidden)[0, :, -1].mean(0)  # (L,)
    return sorted((row[start : start + n].topk(keep).indices + start).tolist())


def run_captured(model, prefix, suffix):
    """One image prompt through `model`, recording every decoder layer's input and output."""
    cap = Capture(model.decoder.layers)
    with torch.no_grad():
        out = model(torch.tensor([image_prompt(prefix, suffix)]), pixel_values=torch.randn(1, 3, 16, 16))
    cap.close()
    return out, cap


def test_fastv_keeps_the_tokens_layer_k_minus_1_attends_to_most():
    model = make_model("fastv", attn="eager", fastv_layer=2, fastv_ratio=0.5)
    prefix, suffix = [1, 5, 6], [7, 8, 9, 10]
    out, cap = run_captured(model, prefix, suffix)
    # layers 0, 1 see all 64 visual tokens; from layer 2 on, floor(64 * 0.5) = 32
    assert out.visual_tokens_per_layer[0].tolist() == [64, 64, 32, 32]
    with torch.no_grad():
        kept = expected_kept(model, 1, cap.inputs[1], len(prefix), N_IMG, 32)
    assert len(kept) == 32 and kept != list(range(3, 35))
    full = cap.outputs[1][0]  # layer 1 output on the full sequence
    order = list(range(len(prefix))) + kept + list(range(len(prefix) + N_IMG, full.shape[0]))
    # layer 2 runs on exactly the kept tokens, in their original order, text untouched
    assert torch.equal(cap.inputs[2][0], full[order])


def test_pdrop_keeps_the_tokens_each_layer_attends_to_most():
    model = make_model("pdrop", attn="eager", pdrop_layers=[1, 3], pdrop_ratio=0.5)
    prefix, suffix = [1, 5], [7, 8, 9]
    out, cap = run_captured(model, prefix, suffix)
    assert out.visual_tokens_per_layer[0].tolist() == [64, 32, 32, 16]
    s = len(prefix)
    with torch.no_grad():
        for layer_i, n, keep in ((1, 64, 32), (3, 32, 16)):
            # PDrop ranks by the layer's own attention on the input it would have seen unpruned
            before = cap.outputs[layer_i - 1][0]
            kept = expected_kept(model, layer_i, before[None], s, n, keep)
            order = list(range(s)) + kept + list(range(s + n, before.shape[0]))
            assert torch.equal(cap.inputs[layer_i][0], before[order]), layer_i


@pytest.mark.parametrize(
    "compressor,kw,expected",
    [
        ("fastv", dict(fastv_layer=1, fastv_ratio=0.3), [64, 44, 44, 44]),  # floor(64 * 0.7) = 44
        ("fastv", dict(fastv_layer=3, fastv_ratio=0.9), [64, 64, 64, 6]),  # floor(64 * 0.1 + eps) = 6
        ("pdrop", dict(pdrop_ratio=0.6), [64, 38, 22, 13]),  # floor(64*.6)=38, floor(38*.6)=22, floor(22*.6)=13
        ("pdrop", dict(pdrop_layers=[2], pdrop_ratio=0.25), [64, 64, 16, 16]),
    ],
)
def test_token_counts_match_definition_and_flops_module(compressor, kw, expected):
    model = make_model(compressor, **kw)
    ids = torch.tensor([image_prompt([1, 5, 6], [7, 8])])
    with torch.no_grad():
        out = model(ids, pixel_values=torch.randn(1, 3, 16, 16), use_cache=True)
    assert out.visual_tokens_per_layer[0].tolist() == expected
    assert out.text_tokens_per_layer[0].tolist() == [5] * 4
    assert (out.visual_tokens_per_layer[0].tolist(), [5] * 4) == analytic_token_counts(model.config, 5)
    # each layer's KV cache holds exactly the tokens that layer saw
    assert [out.cache.get_seq_length(i) for i in range(4)] == [v + 5 for v in expected]


def test_text_only_and_mixed_batches_prune_per_sample():
    model = make_model("pdrop")
    seqs = [image_prompt([1, 5], [7, 8, 9]), [1, 4, 5, 6], image_prompt([1], [2, 3, 4, 5, 6, 7])]
    L = max(map(len, seqs))
    ids = torch.tensor([[PAD] * (L - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (L - len(s)) + [1] * len(s) for s in seqs])
    px = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        batch = model(ids, pixel_values=px, attention_mask=mask)
        assert batch.visual_tokens_per_layer.tolist() == [[64, 32, 16, 8], [0] * 4, [64, 32, 16, 8]]
        for b, (s, img) in enumerate(zip(seqs, (0, None, 1), strict=True)):
            alone = model(torch.tensor([s]), pixel_values=None if img is None else px[img : img + 1])
            assert torch.allclose(batch.logits[b][batch.attention_mask[b]], alone.logits[0], atol=1e-5), b


# ----- training ----------------------------------------------------------------------------------------
def test_pdrop_trains_through_the_kept_tokens_and_ranks_before_the_answer():
    model = make_model("pdrop").train()
    prompt = image_prompt([1, 5, 6], [7, 8])
    answer = [11, 12, 13]
    seqs = [prompt + answer, image_prompt([1, 9], [17]) + [14, 15]]
    L = max(map(len, seqs))
    ids = torch.tensor([s + [PAD] * (L - len(s)) for s in seqs])  # right padding, as in training
    mask = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs])
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[0, : len(prompt)] = IGNORE_INDEX
    labels[1, : len(seqs[1]) - 2] = IGNORE_INDEX
    px = torch.randn(2, 3, 16, 16)
    seen = {}

    def keep_grad(module, args, out):
        out.retain_grad()
        seen["layer0"] = out

    handle = model.decoder.layers[0].register_forward_hook(keep_grad)
    out = model(ids, pixel_values=px, attention_mask=mask, labels=labels)
    handle.remove()
    out.loss.backward()
    assert int(out.num_label_tokens) == 3 + 2
    # Layer 0's visual outputs reach the loss only through the 32 tokens PDrop keeps before layer 1:
    # exactly those get gradients, the dropped ones none.
    grad = seen["layer0"].grad[:, 3 : 3 + N_IMG].abs().sum(-1)  # (2, 64); sample 1's image starts at 2
    grad[1] = seen["layer0"].grad[1, 2 : 2 + N_IMG].abs().sum(-1)
    assert ((grad > 0).sum(-1) == 32).all()
    # ranking by the last prompt token: the same as pinning that position
    model.eval()
    with torch.no_grad():
        by_labels = model(ids, pixel_values=px, attention_mask=mask, labels=labels)
        pinned = model(ids, pixel_values=px, attention_mask=mask, route_index=torch.tensor([len(prompt) - 1, len(seqs[1]) - 3]))
        by_last = model(ids, pixel_values=px, attention_mask=mask)  # last real token = an answer token
    assert torch.equal(by_labels.logits, pinned.logits)
    assert not torch.equal(by_labels.logits, by_last.logits)


def test_fastv_rejects_layer_zero():
    with pytest.raises(ValueError, match=r"fastv_layer must lie in \[1, 3\], got 0"):
        test_tiny(compressor="fastv", fastv_layer=0)


# ----- FLOPs under torch's counter ---------------------------------------------------------------------
@pytest.mark.parametrize("compressor", ["fastv", "pdrop"])
def test_model_flops_match_counter(compressor):
    model = make_model(compressor)
    cfg = model.config
    n_text = 7
    ids = torch.tensor([[1, 5, 6] + [IMG] * N_IMG + [7, 8, 9, 10]])
    with flop_counter_mode() as fc, torch.no_grad():
        out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 16, 16))
    vis = out.visual_tokens_per_layer[0].tolist()
    assert (vis, [n_text] * 4) == analytic_token_counts(cfg, n_text)
    counts = fc.get_flop_counts()
    prefix = "DPNForConditionalGeneration"
    layers = [sum(counts[f"{prefix}.language_model.model.layers.{i}"].values()) for i in range(4)]
    # every decoder layer runs on exactly its reported token count
    assert layers == [llm_layer_flops(v + n_text, cfg.text_config, "exact") for v in vis]
    # and the only other LLM work is the ranking: one per FastV / PDrop layer, on the pre-pruning length
    rank_lengths = [vis[cfg.fastv_layer - 1]] if compressor == "fastv" else [vis[i - 1] for i in cfg.pdrop_layers]
    extra = sum(ranking_flops(n + n_text, 1, cfg.text_config) for n in rank_lengths)
    total = sum(counts[prefix].values())
    assert total == (
        sum(layers)
        + extra
        + vision_tower_flops(cfg.vision_config, None)
        + projector_flops(cfg)
        + lm_head_flops(cfg.text_config, vis[-1] + n_text)
    )
