"""Cached generation under compression: per-layer caches, left-padded batches, sampling."""

from __future__ import annotations

import pytest
import torch

from dpn.modeling_dpn import DPNForConditionalGeneration
from dpn.presets import test_tiny

IMG, ROUTER, PAD, EOS = 60, 61, 0, 2
N_IMG = test_tiny().num_image_tokens


def left_pad(prompts):
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


PROMPTS = [
    [1, 5, 6] + [IMG] * N_IMG + [7, 8, ROUTER],
    [1, 9] + [IMG] * N_IMG + [17, 18, 19, 20, ROUTER],
    [1, 3, 4, 5, 6],  # text-only
    [1, 11] + [IMG] * N_IMG + [12],  # no <ROUTER>: routed from its last prompt token
]
IMAGE_OF = {0: 0, 1: 1, 3: 2}


def make_model(compressor, **kw):
    torch.manual_seed(0)
    model = DPNForConditionalGeneration(test_tiny(compressor=compressor, router_token_id=ROUTER, **kw)).eval()
    if compressor == "dpn":
        for r in model.routers.values():  # opinionated routers: samples take different paths
            torch.nn.init.normal_(r.fc1.weight, std=0.02)  # small first layer, large second: opinionated
            torch.nn.init.normal_(r.fc2.weight, std=5.0)
    return model


@pytest.mark.parametrize("compressor", ["none", "static", "dpn", "fastv", "pdrop"])
def test_cached_equals_uncached_and_batched_equals_alone(compressor):
    model = make_model(compressor)
    px = torch.randn(3, 3, 16, 16)
    ids, mask = left_pad(PROMPTS)
    kw = dict(max_new_tokens=10, eos_token_id=-1, return_dict_in_generate=True)
    cached = model.generate(ids, pixel_values=px, attention_mask=mask, **kw)
    uncached = model.generate(ids, pixel_values=px, attention_mask=mask, use_cache=False, **kw)
    assert cached.sequences.tolist() == uncached.sequences.tolist()
    for b, p in enumerate(PROMPTS):
        px_b = px[IMAGE_OF[b] : IMAGE_OF[b] + 1] if b in IMAGE_OF else None
        alone = model.generate(torch.tensor([p]), pixel_values=px_b, **kw)
        assert alone.new_tokens[0].tolist() == cached.new_tokens[b].tolist(), b
        assert alone.routing_paths[0].tolist() == cached.routing_paths[b].tolist()
        assert alone.visual_tokens_per_layer[0].tolist() == cached.visual_tokens_per_layer[b].tolist()
    if compressor != "none":
        assert (cached.visual_tokens_per_layer[:, -1] < cached.visual_tokens_per_layer[:, 0]).sum() == 3


@pytest.mark.parametrize(
    "compressor,kw,lengths",
    [
        # layer 0 sees all 64 visual tokens, layer 1 16 (after (2,2)), layers 2-3 8 (after (1,2)); 6 text tokens
        ("static", dict(static_path=[4, 2, 1]), [70, 22, 14, 14]),
        # FastV K=2: layers 0-1 all 64, then floor(64 * 0.5) = 32
        ("fastv", dict(fastv_layer=2, fastv_ratio=0.5), [70, 70, 38, 38]),
        # PDrop at layers 1/2/3: 64 -> 32 -> 16 -> 8
        ("pdrop", dict(), [70, 38, 22, 14]),
    ],
)
def test_each_layer_cache_has_its_own_length(compressor, kw, lengths):
    model = make_model(compressor, **kw)
    ids = torch.tensor([PROMPTS[0]])
    out = model(ids, pixel_values=torch.randn(1, 3, 16, 16), use_cache=True)
    assert [out.cache.get_seq_length(i) for i in range(4)] == lengths
    step = model(torch.tensor([[9]]), cache=out.cache)
    assert [step.cache.get_seq_length(i) for i in range(4)] == [n + 1 for n in lengths]


@pytest.mark.parametrize("compressor", ["dpn", "fastv", "pdrop"])
def test_sampling_is_reproducible_and_matches_uncached(compressor):
    model = make_model(compressor)
    ids, mask = left_pad(PROMPTS[:2])
    px = torch.randn(2, 3, 16, 16)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, top_k=20, eos_token_id=-1)
    a = model.generate(ids, pixel_values=px, attention_mask=mask, generator=torch.Generator().manual_seed(7), **kw)
    b = model.generate(ids, pixel_values=px, attention_mask=mask, generator=torch.Generator().manual_seed(7),
                       use_cache=False, **kw)
    assert a.tolist() == b.tolist()


def test_eos_stops_and_pads():
    model = make_model("none")
    ids = torch.tensor([PROMPTS[2]])
    first = model.generate(ids, max_new_tokens=3, eos_token_id=-1)[0, ids.shape[1]].item()
    out = model.generate(ids, max_new_tokens=5, eos_token_id=first, pad_token_id=PAD, return_dict_in_generate=True)
    assert out.new_tokens.tolist() == [[first]] and out.num_new_tokens.tolist() == [1]


def test_default_output_is_prompt_plus_new_tokens_as_in_transformers():
    model = make_model("dpn")
    ids, mask = left_pad(PROMPTS[:2])
    px = torch.randn(2, 3, 16, 16)
    seq = model.generate(ids, pixel_values=px, attention_mask=mask, max_new_tokens=4, eos_token_id=-1)
    rich = model.generate(ids, pixel_values=px, attention_mask=mask, max_new_tokens=4, eos_token_id=-1,
                          return_dict_in_generate=True)
    assert isinstance(seq, torch.Tensor) and seq.shape == (2, ids.shape[1] + 4)
    assert seq[:, : ids.shape[1]].tolist() == ids.tolist()
    assert seq.tolist() == rich.sequences.tolist() and rich.prompt_length == ids.shape[1]


def test_right_padded_prompts_give_the_tokens_of_left_padded_ones():
    model = make_model("dpn")
    px = torch.randn(3, 3, 16, 16)
    ids, mask = left_pad(PROMPTS)
    L = ids.shape[1]
    r_ids = torch.tensor([p + [PAD] * (L - len(p)) for p in PROMPTS])
    r_mask = torch.tensor([[1] * len(p) + [0] * (L - len(p)) for p in PROMPTS])
    kw = dict(max_new_tokens=6, eos_token_id=-1, return_dict_in_generate=True)
    left = model.generate(ids, pixel_values=px, attention_mask=mask, **kw)
    right = model.generate(r_ids, pixel_values=px, attention_mask=r_mask, **kw)
    assert right.new_tokens.tolist() == left.new_tokens.tolist()
    assert right.routing_paths.tolist() == left.routing_paths.tolist()


@pytest.mark.parametrize("use_cache", [True, False])
def test_equal_length_prompts_on_different_forced_paths_equal_each_alone(use_cache):
    """No padding at all, different routes per sample: the bug where the re-padded batch was padded on the
    right and the next token was read from a padding position."""
    model = make_model("dpn")
    prompts = [[1, 5, 6] + [IMG] * N_IMG + [7, 8, ROUTER], [1, 9, 4] + [IMG] * N_IMG + [17, 18, ROUTER]]
    px = torch.randn(2, 3, 16, 16)
    paths = torch.tensor([[2, 1, 0], [0, 0, 0]])  # 64 -> 16 -> 8 -> 8 against 64 everywhere
    kw = dict(max_new_tokens=6, eos_token_id=-1, return_dict_in_generate=True, use_cache=use_cache)
    batch = model.generate(torch.tensor(prompts), pixel_values=px, force_path=paths, **kw)
    assert batch.visual_tokens_per_layer[:, -1].tolist() == [8, 64]
    for b, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), pixel_values=px[b : b + 1], force_path=paths[b : b + 1], **kw)
        assert alone.new_tokens[0].tolist() == batch.new_tokens[b].tolist(), b
        assert alone.routing_paths[0].tolist() == batch.routing_paths[b].tolist()
