"""LLaVA-HR (`dpn.vision_hr`, `dpn.loading_hr`): a tiny checkpoint written in the ORIGINAL LLaVA-HR key
layout loads and gives the logits of a re-implementation of LLaVA-HR's forward written here from its
description (functional ops on the original tensors + transformers' LLaMA); a batch on different forced
paths equals each sample alone; our save_pretrained format round-trips; the parts (Vicuna + CLIP + timm
ConvNeXt + LLaVA-HR's stage-1 file) assemble; FLOPs are exact against torch's counter; `dpn flops`."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from dpn.configuration_hr import LlavaHRVisionConfig
from dpn.flops import analytic_token_counts, flop_counter_mode, flops_report, hr_vision_flops
from dpn.loading_hr import from_hr_components, from_llava_hr
from dpn.modeling_dpn import DPNForConditionalGeneration
from dpn.presets import llava_hr_tiny
from dpn.vision_hr import LlavaHRVisionModel
from jobs.cli import main as cli_main

IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder for the image in input_ids
VOCAB = 256
T = "model.vision_tower."
CLIP = T + "fast_vision_tower.vision_tower.vision_model."
CNX = T + "slow_vision_tower.vision_tower."
# Tiny geometry as `llava_hr_tiny`: CLIP width 128 (2 heads of 64), FFN 256, 4 layers, 4-px patches; ConvNeXt
# 1-px stem, widths 8/16/24/32, one block per stage; LLM d=64.
D, FFN_V, LAYERS_V, P = 128, 256, 4, 4
WIDTHS, STEM = [8, 16, 24, 32], 1
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, hidden_act="silu",
            rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


# ----- a checkpoint in LLaVA-HR's own key names -----------------------------------------------------------
def original_state(clip_image_size: int, adapters: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the names LLaVA-HR's `LlavaLlamaForCausalLM.state_dict()` has (timm ConvNeXt,
    transformers-4 CLIP under `vision_model.`, `align_stages(_latent)`, `mm_projector`, LLaMA)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=0.1, mean=0.0):
        return mean + scale * torch.randn(*shape, generator=g)

    sd: dict[str, torch.Tensor] = {}
    n_pos = (clip_image_size // P) ** 2 + 1
    sd[CLIP + "embeddings.class_embedding"] = w(D)
    sd[CLIP + "embeddings.patch_embedding.weight"] = w(D, 3, P, P)
    sd[CLIP + "embeddings.position_embedding.weight"] = w(n_pos, D)
    sd[CLIP + "embeddings.position_ids"] = torch.arange(n_pos)[None]  # older checkpoints persist it
    for n in ("pre_layrnorm", "post_layernorm"):
        sd[CLIP + f"{n}.weight"], sd[CLIP + f"{n}.bias"] = w(D, mean=1.0), w(D)
    for i in range(LAYERS_V):
        pre = CLIP + f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[pre + f"self_attn.{proj}.weight"], sd[pre + f"self_attn.{proj}.bias"] = w(D, D), w(D)
        for ln in ("layer_norm1", "layer_norm2"):
            sd[pre + f"{ln}.weight"], sd[pre + f"{ln}.bias"] = w(D, mean=1.0), w(D)
        sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"] = w(FFN_V, D), w(FFN_V)
        sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"] = w(D, FFN_V), w(D)
    sd[CNX + "stem.0.weight"], sd[CNX + "stem.0.bias"] = w(WIDTHS[0], 3, STEM, STEM), w(WIDTHS[0])
    sd[CNX + "stem.1.weight"], sd[CNX + "stem.1.bias"] = w(WIDTHS[0], mean=1.0), w(WIDTHS[0])
    for i, c in enumerate(WIDTHS):
        pre = CNX + f"stages.{i}."
        if i:
            sd[pre + "downsample.0.weight"], sd[pre + "downsample.0.bias"] = w(WIDTHS[i - 1], mean=1.0), w(WIDTHS[i - 1])
            sd[pre + "downsample.1.weight"], sd[pre + "downsample.1.bias"] = w(c, WIDTHS[i - 1], 2, 2), w(c)
        b = pre + "blocks.0."
        sd[b + "conv_dw.weight"], sd[b + "conv_dw.bias"] = w(c, 1, 7, 7), w(c)
        sd[b + "norm.weight"], sd[b + "norm.bias"] = w(c, mean=1.0), w(c)
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = w(4 * c, c), w(4 * c)
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = w(c, 4 * c), w(c)
        sd[b + "weight"] = w(c, mean=0.5)  # layer scale ("gamma", renamed by LLaVA-HR's vendored timm)
    C = WIDTHS[-1]
    sd[CNX + "head.norm.weight"], sd[CNX + "head.norm.bias"] = w(C, mean=1.0), w(C)
    sd[CNX + "head.pre_logits.fc.weight"], sd[CNX + "head.pre_logits.fc.bias"] = w(C, C), w(C)
    sd[CNX + "head.fc.weight"], sd[CNX + "head.fc.bias"] = w(10, C), w(10)
    if adapters:
        for k in range(3):
            pre = T + f"align_stages_latent.{k}."
            sd[pre + "slow_conv.weight"], sd[pre + "slow_conv.bias"] = w(C, C, 1, 1), w(C)
            sd[pre + "slow_proj.weight"], sd[pre + "slow_proj.bias"] = w(D, C, 1, 1), w(D)
            sd[pre + "fast_conv.weight"], sd[pre + "fast_conv.bias"] = w(D, 1, 7, 7), w(D)
            sd[pre + "fast_proj.weight"], sd[pre + "fast_proj.bias"] = w(D, D, 1, 1, scale=0.05), w(D)
            sd[pre + "gate.0.weight"], sd[pre + "gate.0.bias"] = w(D // 2, 2 * D), w(D // 2)
            sd[pre + "gate.2.weight"], sd[pre + "gate.2.bias"] = w(1, D // 2, scale=1.0), w(1)
    sd[T + "align_stages.0.fast_proj.weight"], sd[T + "align_stages.0.fast_proj.bias"] = w(D, D), w(D)
    sd[T + "align_stages.0.slow_proj.weight"], sd[T + "align_stages.0.slow_proj.bias"] = w(D, C), w(D)
    d = TEXT["hidden_size"]
    sd["model.mm_projector.0.weight"], sd["model.mm_projector.0.bias"] = w(d, D), w(d)
    sd["model.mm_projector.2.weight"], sd["model.mm_projector.2.bias"] = w(d, d), w(d)
    sd["model.embed_tokens.weight"] = w(VOCAB, d)
    kv = d // TEXT["num_attention_heads"] * TEXT["num_key_value_heads"]
    for i in range(TEXT["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        sd[pre + "self_attn.q_proj.weight"], sd[pre + "self_attn.o_proj.weight"] = w(d, d), w(d, d)
        sd[pre + "self_attn.k_proj.weight"], sd[pre + "self_attn.v_proj.weight"] = w(kv, d), w(kv, d)
        sd[pre + "mlp.gate_proj.weight"], sd[pre + "mlp.up_proj.weight"] = w(128, d), w(128, d)
        sd[pre + "mlp.down_proj.weight"] = w(d, 128)
        sd[pre + "input_layernorm.weight"], sd[pre + "post_attention_layernorm.weight"] = w(d, mean=1.0), w(d, mean=1.0)
    sd["model.norm.weight"], sd["lm_head.weight"] = w(d, mean=1.0), w(VOCAB, d)
    return sd


def write_original(directory, image_size: int, clip_image_size: int, adapters: bool = True):
    """An LLaVA-HR checkpoint directory: config.json as its train.py writes it, two .bin shards + index."""
    directory.mkdir(parents=True, exist_ok=True)
    sd = original_state(clip_image_size, adapters)
    config = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", **TEXT, "torch_dtype": "float32",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "vision_tower_slow": "convnext_large_mlp.clip_laion2b_ft_320",
        "is_multipath_encoder": True, "input_image_size": image_size, "freeze_vision": not adapters,
        "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": D, "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad", "use_mm_proj": True,
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "tune_mm_mlp_adapter": False,
    }
    (directory / "config.json").write_text(json.dumps(config))
    llm = {k: v for k, v in sd.items() if not k.startswith((T, "model.mm_projector"))}
    rest = {k: v for k, v in sd.items() if k not in llm}
    names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    for name, part in zip(names, (llm, rest), strict=True):
        torch.save(part, directory / name)
    index = {"weight_map": {k: names[0] if k in llm else names[1] for k in sd}}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return sd


# ----- LLaVA-HR's forward, re-implemented from its description on the original tensors ---------------------
def _ln_cf(x, w, b, eps):  # LayerNorm over channels of (B, C, H, W)
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b, eps).permute(0, 3, 1, 2)


def _align(tokens, side):  # LLaVA-HR's src2dst_align: bilinear up (align_corners) or average-pool down
    b, n, c = tokens.shape
    s = math.isqrt(n)
    grid = tokens.transpose(1, 2).reshape(b, c, s, s)
    if s < side:
        grid = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=True)
    elif s > side:
        grid = F.avg_pool2d(grid, s // side, s // side)
    return grid.reshape(b, c, -1).transpose(1, 2)


def reference_vision(sd, px, image_size, eps=1e-6):
    """MultiPathCLIPVisionTower.forward + mm_projector, written out with functional ops."""
    # fast branch input: max(int(S / 32 * 14), 336) in LLaVA-HR, i.e. (S / convnext stride) patches, at least
    # CLIP's native size
    native = math.isqrt(sd[CLIP + "embeddings.position_embedding.weight"].shape[0] - 1) * P
    stride = STEM * 2 ** (len(WIDTHS) - 1)
    fast_size = max(image_size // stride * P, native)
    y = F.interpolate(px.float(), size=(fast_size, fast_size), mode="bilinear", align_corners=True)
    y = F.conv2d(y, sd[CLIP + "embeddings.patch_embedding.weight"], stride=P).flatten(2).transpose(1, 2)
    y = torch.cat([sd[CLIP + "embeddings.class_embedding"].expand(y.shape[0], 1, D), y], dim=1)
    pos = sd[CLIP + "embeddings.position_embedding.weight"][None]  # timm resample_pos_embed, CLS kept aside
    side, old = math.isqrt(y.shape[1] - 1), math.isqrt(pos.shape[1] - 1)
    if side != old:
        grid = pos[:, 1:].reshape(1, old, old, D).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(side, side), mode="bicubic", antialias=True)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, D)], dim=1)
    y = F.layer_norm((y + pos)[:, 1:], (D,), sd[CLIP + "pre_layrnorm.weight"], sd[CLIP + "pre_layrnorm.bias"], 1e-5)
    # slow branch: timm ConvNeXt stem + stages
    x = _ln_cf(F.conv2d(px, sd[CNX + "stem.0.weight"], sd[CNX + "stem.0.bias"], stride=STEM),
               sd[CNX + "stem.1.weight"], sd[CNX + "stem.1.bias"], eps)
    for i, c in enumerate(WIDTHS):
        pre = CNX + f"stages.{i}."
        if i:
            x = _ln_cf(x, sd[pre + "downsample.0.weight"], sd[pre + "downsample.0.bias"], eps)
            x = F.conv2d(x, sd[pre + "downsample.1.weight"], sd[pre + "downsample.1.bias"], stride=2)
        b = pre + "blocks.0."
        h = F.conv2d(x, sd[b + "conv_dw.weight"], sd[b + "conv_dw.bias"], padding=3, groups=c).permute(0, 2, 3, 1)
        h = F.layer_norm(h, (c,), sd[b + "norm.weight"], sd[b + "norm.bias"], eps)
        h = F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])), sd[b + "mlp.fc2.weight"],
                     sd[b + "mlp.fc2.bias"])
        x = x + (h * sd[b + "weight"]).permute(0, 3, 1, 2)

    def clip_layer(y, i):
        pre = CLIP + f"encoder.layers.{i}."
        h = F.layer_norm(y, (D,), sd[pre + "layer_norm1.weight"], sd[pre + "layer_norm1.bias"], 1e-5)
        q, k, v = (F.linear(h, sd[pre + f"self_attn.{n}_proj.weight"], sd[pre + f"self_attn.{n}_proj.bias"])
                   for n in ("q", "k", "v"))
        heads = D // 64
        q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, 64).transpose(1, 2) for t in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1) @ v
        a = a.transpose(1, 2).reshape(y.shape)
        y = y + F.linear(a, sd[pre + "self_attn.out_proj.weight"], sd[pre + "self_attn.out_proj.bias"])
        h = F.layer_norm(y, (D,), sd[pre + "layer_norm2.weight"], sd[pre + "layer_norm2.bias"], 1e-5)
        h = F.linear(h, sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"])
        h = h * torch.sigmoid(1.702 * h)  # quick_gelu
        return y + F.linear(h, sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"])

    def adapter(y, k):  # S2FStitchAlignModuleV2
        pre = T + f"align_stages_latent.{k}."
        s = F.conv2d(F.gelu(F.conv2d(x, sd[pre + "slow_conv.weight"], sd[pre + "slow_conv.bias"])),
                     sd[pre + "slow_proj.weight"], sd[pre + "slow_proj.bias"])
        side = math.isqrt(y.shape[1])
        s = _align(s.flatten(2).transpose(1, 2), side)
        f = y.transpose(1, 2).reshape(y.shape[0], D, side, side)
        f = f + F.conv2d(F.gelu(F.conv2d(f, sd[pre + "fast_conv.weight"], sd[pre + "fast_conv.bias"], padding=3,
                                         groups=D)), sd[pre + "fast_proj.weight"], sd[pre + "fast_proj.bias"])
        f = f.flatten(2).transpose(1, 2)
        gate = F.linear(F.gelu(F.linear(torch.cat([f, s], -1).mean(1), sd[pre + "gate.0.weight"], sd[pre + "gate.0.bias"])),
                        sd[pre + "gate.2.weight"], sd[pre + "gate.2.bias"]).unsqueeze(1)
        return f + s * gate.tanh()

    per = LAYERS_V // 4
    for grp in range(4):
        for i in range(grp * per, (grp + 1) * per):
            y = clip_layer(y, i)
        if grp < 3 and T + "align_stages_latent.0.gate.0.weight" in sd:
            y = adapter(y, grp)
    s = _align(x.flatten(2).transpose(1, 2), math.isqrt(y.shape[1]))
    y = F.linear(y, sd[T + "align_stages.0.fast_proj.weight"], sd[T + "align_stages.0.fast_proj.bias"]) + F.linear(
        s, sd[T + "align_stages.0.slow_proj.weight"], sd[T + "align_stages.0.slow_proj.bias"])
    y = F.linear(y, sd["model.mm_projector.0.weight"], sd["model.mm_projector.0.bias"])
    return F.linear(F.gelu(y), sd["model.mm_projector.2.weight"], sd["model.mm_projector.2.bias"])


def reference_logits(sd, ids_with_placeholder, px, image_size):
    """prepare_inputs_labels_for_multimodal + LlamaForCausalLM: the image features replace the -200 token."""
    llama = LlamaForCausalLM(LlamaConfig(**TEXT)).eval()
    llama.load_state_dict({k: v for k, v in sd.items() if k.startswith(("model.embed", "model.layers", "model.norm",
                                                                        "lm_head"))}, strict=True)
    feats = reference_vision(sd, px, image_size)
    rows = []
    for b, ids in enumerate(ids_with_placeholder):
        at = ids.index(IMAGE_TOKEN_INDEX)
        emb = llama.model.embed_tokens
        rows.append(torch.cat([emb(torch.tensor(ids[:at])), feats[b], emb(torch.tensor(ids[at + 1 :]))]))
    return llama(inputs_embeds=torch.stack(rows)).logits


@pytest.mark.parametrize("image_size,clip_native,adapters", [
    (64, 24, True),   # the tiny preset: CLIP's 6x6 position table resampled to 8x8, equal grids, adapters
    (32, 32, False),  # a 4x4 ConvNeXt map upsampled to CLIP's 8x8 grid (LLaVA-HR's 384-px stage 1), no adapters
])
def test_original_checkpoint_loads_and_matches_the_reference_forward(tmp_path, image_size, clip_native, adapters):
    sd = write_original(tmp_path / "llava-hr", image_size, clip_native, adapters)
    model = from_llava_hr(tmp_path / "llava-hr", compressor="none")
    vc = model.config.vision_config
    assert isinstance(vc, LlavaHRVisionConfig) and vc.mr_adapters == adapters and vc.image_size == image_size
    assert model.config.num_image_tokens == 64 and vc.clip_config.num_attention_heads == 2
    img = model.config.image_token_id
    prompts = [[1, 5, 6, IMAGE_TOKEN_INDEX, 7, 8, 9], [1, 9, IMAGE_TOKEN_INDEX, 17, 18, 19, 20]]
    px = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([sum(([img] * 64 if t == IMAGE_TOKEN_INDEX else [t] for t in p), []) for p in prompts])
    with torch.no_grad():
        ours = model(ids, pixel_values=px).logits
        want = reference_logits(sd, prompts, px, image_size)
    assert ours.shape == want.shape
    assert torch.allclose(ours, want, atol=1e-4), (ours - want).abs().max()


def test_loading_errors_name_the_file_and_key(tmp_path):
    d = tmp_path / "ckpt"
    sd = write_original(d, 64, 24)
    missing = dict(sd)
    missing.pop(CNX + "stages.2.blocks.0.mlp.fc1.bias")
    torch.save(missing, d / "pytorch_model-00002-of-00002.bin")
    torch.save({}, d / "pytorch_model-00001-of-00002.bin")
    with pytest.raises(ValueError, match=r"convnext\.encoder\.stages\.2\.layers\.0\.pwconv1\.bias"):
        from_llava_hr(d)
    torch.save({**sd, T + "align_stages.1.fast_proj.weight": torch.zeros(2)}, d / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(ValueError, match=r"align_stages\.1\.fast_proj\.weight"):
        from_llava_hr(d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "is_multipath_encoder": False}))
    with pytest.raises(ValueError, match="is_multipath_encoder"):
        from_llava_hr(d)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        from_llava_hr(tmp_path / "absent")


def _prompt(prefix, suffix, img=4):
    return list(prefix) + [img] * 64 + list(suffix)


def test_batch_on_different_paths_equals_each_sample_alone():
    torch.manual_seed(0)
    model = DPNForConditionalGeneration(llava_hr_tiny(compressor="dpn")).eval()
    seqs = [_prompt([1, 7, 8], [9, 10, 5]), _prompt([1, 11], [12, 13, 14, 5]), [1, 15, 16, 17]]
    paths = torch.tensor([[2, 1, 0], [1, 2, 0], [0, 0, 0]])
    px = torch.randn(2, 3, 64, 64)
    L = max(map(len, seqs))
    ids = torch.tensor([s + [3] * (L - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs])
    with torch.no_grad():
        batch = model(ids, pixel_values=px, attention_mask=mask, force_path=paths)
        for b, s in enumerate(seqs):
            alone = model(torch.tensor([s]), pixel_values=px[b : b + 1] if b < 2 else None, force_path=paths[b : b + 1])
            got = batch.logits[b][batch.attention_mask[b]]
            assert got.shape == alone.logits[0].shape
            assert torch.allclose(got, alone.logits[0], atol=1e-5), b
    assert batch.visual_tokens_per_layer[:2].tolist() == [[64, 16, 8, 8], [64, 32, 8, 8]]


def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DPNForConditionalGeneration(llava_hr_tiny(compressor="static")).eval()
    model.save_pretrained(tmp_path / "m")
    again = DPNForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    assert isinstance(again.config.vision_config, LlavaHRVisionConfig)
    def geometry(v):
        c, x = v.clip_config, v.convnext_config
        return (v.image_size, v.mr_adapters, v.grid, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                c.image_size, c.patch_size, x.hidden_sizes, x.depths, x.patch_size, x.layer_norm_eps)

    assert geometry(again.config.vision_config) == geometry(model.config.vision_config)
    ids, px = torch.tensor([_prompt([1, 7], [9, 5])]), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(ids, pixel_values=px).logits, again(ids, pixel_values=px).logits)


def test_fresh_adapters_are_the_identity():
    """LLaVA-HR zero-initialises the adapters' output projections: a fresh stage-2 tower equals one
    without adapters on the same weights."""
    torch.manual_seed(0)
    with_adapters = LlavaHRVisionModel(llava_hr_tiny().vision_config).eval()
    without = LlavaHRVisionModel(LlavaHRVisionConfig(**{**llava_hr_tiny().vision_config.to_dict(),
                                                        "mr_adapters": False})).eval()
    without.load_state_dict({k: v for k, v in with_adapters.state_dict().items() if "mr_adapters" not in k})
    px = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(with_adapters(px), without(px), atol=1e-6)


def test_gradient_checkpointing_keeps_the_gradients():
    torch.manual_seed(0)
    tower = LlavaHRVisionModel(llava_hr_tiny().vision_config).train()
    px = torch.randn(2, 3, 64, 64)

    def grads():
        tower.zero_grad()
        tower(px).square().mean().backward()
        return {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}

    plain = grads()
    tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert tower.gradient_checkpointing and tower.clip.encoder.layers[0].gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and "convnext.encoder.stages.0.layers.0.pwconv1.weight" in plain
    for name, g in plain.items():
        assert torch.allclose(g, checkpointed[name], atol=1e-6), name


def test_components_assemble_with_llava_hr_stage1_file(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TEXT)).save_pretrained(tmp_path / "vicuna")
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=D, intermediate_size=FFN_V, num_hidden_layers=LAYERS_V,
                                            num_attention_heads=2, image_size=24, patch_size=P))
    clip.save_pretrained(tmp_path / "clip")
    sd = original_state(24, adapters=False)
    (tmp_path / "convnext").mkdir()
    save_file({k[len(CNX):]: v.contiguous() for k, v in sd.items() if k.startswith(CNX)},
              str(tmp_path / "convnext" / "model.safetensors"))  # a timm hub directory
    (tmp_path / "convnext" / "config.json").write_text(json.dumps({"architecture": "convnext_large_mlp"}))
    stage1 = {k: v for k, v in sd.items() if k.startswith(("model.mm_projector.", T + "align_stages.0."))}
    torch.save(stage1, tmp_path / "mm_projector.bin")
    model = from_hr_components(tmp_path / "vicuna", tmp_path / "clip", tmp_path / "convnext",
                               tmp_path / "mm_projector.bin", image_size=64, compressor="dpn").eval()
    mine = model.state_dict()
    assert torch.equal(mine["vision_tower.convnext.encoder.stages.1.layers.0.layer_scale_parameter"],
                       sd[CNX + "stages.1.blocks.0.weight"])
    assert torch.equal(mine["vision_tower.fusion.slow_proj.weight"], sd[T + "align_stages.0.slow_proj.weight"])
    assert torch.equal(mine["multi_modal_projector.linear_2.weight"], sd["model.mm_projector.2.weight"])
    assert torch.equal(mine["vision_tower.clip.encoder.layers.3.mlp.fc1.weight"],
                       clip.state_dict()["encoder.layers.3.mlp.fc1.weight"])
    for k in range(3):  # stage 2 starts with identity adapters
        assert not model.vision_tower.mr_adapters[k].fast_proj.weight.any()
        assert not model.vision_tower.mr_adapters[k].slow_proj.weight.any()
        assert model.vision_tower.mr_adapters[k].slow_conv.weight.std() > 0
    with torch.no_grad():
        out = model(torch.tensor([_prompt([1, 7], [9], img=model.config.image_token_id)]),
                    pixel_values=torch.randn(1, 3, 64, 64))
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("image_size,clip_native,adapters", [(64, 24, True), (32, 32, False)])
def test_vision_flops_are_exact(image_size, clip_native, adapters):
    base = llava_hr_tiny().vision_config.to_dict()
    base["clip_config"]["image_size"] = clip_native
    cfg = LlavaHRVisionConfig(**{**base, "image_size": image_size, "mr_adapters": adapters})
    tower = LlavaHRVisionModel(cfg).eval()
    with flop_counter_mode() as fc, torch.no_grad():
        tower(torch.randn(2, 3, image_size, image_size))
    assert fc.get_total_flops() == sum(hr_vision_flops(cfg, n_images=2).values())


def test_dpn_flops_prices_the_hr_presets(capsys):
    assert cli_main(["flops", "--preset", "llava-hr-7b", "--compressor", "none"]) == 0
    none = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert none["visual_tokens_per_layer"] == [1024] * 32 and none["saving"] == 0.0
    assert set(none["vision_tflops_by_part"]) == {"clip", "convnext", "mr_adapters", "fusion"}
    # CLIP-L at 448 px: 24 layers on 1024 tokens; ConvNeXt-L at 1024 px (timm: 34.4 GMACs at 224 px).
    assert none["vision_tflops_by_part"]["clip"] == pytest.approx(0.7227, rel=1e-3)
    assert none["vision_tflops_by_part"]["convnext"] == pytest.approx(2 * 34.4e9 * (1024 / 224) ** 2 / 1e12, rel=0.02)
    assert none["projector_tflops"] == pytest.approx((2 * 1024 * 1024 * 4096 + 2 * 1024 * 4096**2) / 1e12)
    assert cli_main(["flops", "--preset", "llava-hr-7b", "--compressor", "dpn", "--path", "4,2,1"]) == 0
    out = capsys.readouterr().out
    dpn = json.loads(out.strip().splitlines()[-1])
    assert dpn["paper_saving"] == 0.40 and "the paper reports 40%" in out
    assert dpn["visual_tokens_per_layer"][:8] == [1024] * 8 and dpn["visual_tokens_per_layer"][-1] == 128
    assert dpn["vision_tflops"] == none["vision_tflops"] and 0.5 < dpn["saving"] < 0.65
    assert cli_main(["flops", "--preset", "llava-hr-x-13b"]) == 0
    x = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert x["paper_saving"] == 0.44 and x["visual_tokens_per_layer"][0] == 1024 and len(x["text_tokens_per_layer"]) == 40
    # ConvNeXt-XXL at 1024 px (timm: 198.1 GMACs at 256 px).
    assert x["vision_tflops_by_part"]["convnext"] == pytest.approx(2 * 198.09e9 * 16 / 1e12, rel=0.02)


def test_analytic_counts_match_the_model_on_every_path():
    torch.manual_seed(0)
    cfg = llava_hr_tiny(compressor="dpn")
    model = DPNForConditionalGeneration(cfg).eval()
    ids, px = torch.tensor([_prompt([1, 7], [9, 5])]), torch.randn(1, 3, 64, 64)
    for path in ([4, 2, 1], [2, 2, 2], [1, 4, 4]):
        force = torch.tensor([[cfg.expert_index(f) for f in path]])
        with torch.no_grad():
            out = model(ids, pixel_values=px, force_path=force)
        vis, txt = analytic_token_counts(cfg, 4, path, "dpn")
        assert out.visual_tokens_per_layer[0].tolist() == vis and out.text_tokens_per_layer[0].tolist() == txt
        rep = flops_report(cfg, vis, txt)
        assert rep["vision_tflops"] == pytest.approx(sum(hr_vision_flops(cfg.vision_config).values()) / 1e12)


def test_dpn_convert_writes_our_format_with_the_same_logits(tmp_path, capsys):
    write_original(tmp_path / "llava-hr", 64, 24)
    out = tmp_path / "ours"
    assert cli_main(["convert", "llava-hr", "--checkpoint", str(tmp_path / "llava-hr"), "--out", str(out),
                     "--dtype", "float32"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["visual_tokens"] == 64 and info["image_size"] == 64
    ours = DPNForConditionalGeneration.from_pretrained(out, compressor="none").eval()
    original = from_llava_hr(tmp_path / "llava-hr", compressor="none")
    img = original.config.image_token_id
    ids, px = torch.tensor([_prompt([1, 7], [9, 10], img=img)]), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(ids, pixel_values=px).logits, original(ids, pixel_values=px).logits, atol=1e-5)
    # An existing --out or a directory that is not an LLaVA-HR checkpoint: exit 2, the value named.
    assert cli_main(["convert", "llava-hr", "--checkpoint", str(tmp_path / "llava-hr"), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["convert", "llava-hr", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "o2").exists()
