"""Loading LLaVA-HR weights (`dpn.vision_hr`) from local directories; nothing is downloaded.

(a) `from_llava_hr(dir, ...)`: an LLaVA-HR checkpoint as its authors' code saves it (luogen1996/LLaVA-HR,
    `LlavaLlamaForCausalLM.save_pretrained`: `config.json` with model_type "llava" and the multi-path keys,
    `pytorch_model-*.bin` or safetensors with the key names below). The geometry is read from the config
    and the weights' shapes (`infer_vision_config`); DPN fields are keyword overrides, routers start fresh.
(b) `from_hr_components(llm, clip, convnext, projector=None, ...)`: Vicuna + CLIP ViT-L/336 + a timm
    ConvNeXt checkpoint (`convnext_large_mlp.clip_laion2b_ft_320`, `convnext_xxlarge.clip_laion2b_soup`)
    + optionally LLaVA-HR's stage-1 file (`mm_projector.bin`: projector and final fusion). The
    MR-adapters start as the identity, as in LLaVA-HR's stage 2.
(c) our own checkpoints: `DPNForConditionalGeneration.from_pretrained(dir)`.

Key mapping, original LLaVA-HR -> ours (T = model.vision_tower; timm's ConvNeXt naming):

    T.fast_vision_tower.vision_tower.vision_model.X        vision_tower.clip.X  (HF CLIP names)
    T.slow_vision_tower.vision_tower.stem.0 / stem.1       vision_tower.convnext.embeddings.patch_embeddings / .layernorm
    ...stages.I.downsample.0 / .1                          ...convnext.encoder.stages.I.downsampling_layer.0 / .1
    ...stages.I.blocks.J.conv_dw / .norm                   ...stages.I.layers.J.dwconv / .layernorm
    ...stages.I.blocks.J.mlp.fc1 / .mlp.fc2                ...stages.I.layers.J.pwconv1 / .pwconv2
    ...stages.I.blocks.J.weight (or .gamma: layer scale)   ...stages.I.layers.J.layer_scale_parameter
    ...head.norm                                           vision_tower.convnext.layernorm  (unused by the forward)
    ...head.fc, head.pre_logits.fc                         (skipped: timm's classifier head)
    T.align_stages_latent.K.X                              vision_tower.mr_adapters.K.X
    T.align_stages.0.X                                     vision_tower.fusion.X
    model.mm_projector.0 / .2                              multi_modal_projector.linear_1 / linear_2
    model.embed_tokens, model.layers.N, model.norm          language_model.model.*
    lm_head                                                language_model.lm_head
A bad path, a missing or unknown weight or a shape mismatch raises an error naming the file and the key.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, CLIPConfig, CLIPVisionConfig, ConvNextConfig, LlamaConfig

from dpn.configuration_dpn import DPNConfig
from dpn.configuration_hr import LlavaHRVisionConfig
from dpn.loading import (
    _FRESH_PREFIXES,
    _build_uninitialised,
    _projector_rename,
    _read_config,
    _rename_llm,
    _rename_vision,
    _require_dir,
    load_weights,
    weight_files,
)
from dpn.modeling_dpn import DPNForConditionalGeneration

_TOWER = "model.vision_tower."
_CLIP_PREFIX = _TOWER + "fast_vision_tower.vision_tower.vision_model."
_CONVNEXT_PREFIX = _TOWER + "slow_vision_tower.vision_tower."
# OpenAI CLIP ViTs all use 64-wide attention heads; the head count is in no LLaVA-HR file.
CLIP_HEAD_DIM = 64
# A fresh tower's modules no LLaVA-HR weight feeds: the ConvNeXt's pooled-output norm (timm's head.norm,
# which the forward never reads; absent from checkpoints saved without the timm head).
_HR_FRESH = (*_FRESH_PREFIXES, "vision_tower.convnext.layernorm.")

# timm ConvNeXt (no prefix) -> transformers ConvNextModel; None = skipped (timm's classifier head).
_TIMM_CONVNEXT_RULES: list[tuple[re.Pattern, str | None]] = [
    (re.compile(r"^stem\.0\.(weight|bias)$"), r"embeddings.patch_embeddings.\1"),
    (re.compile(r"^stem\.1\.(weight|bias)$"), r"embeddings.layernorm.\1"),
    (re.compile(r"^stages\.(\d+)\.downsample\.([01])\.(weight|bias)$"), r"encoder.stages.\1.downsampling_layer.\2.\3"),
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.(weight|bias)$"), r"encoder.stages.\1.layers.\2.dwconv.\3"),
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.norm\.(weight|bias)$"), r"encoder.stages.\1.layers.\2.layernorm.\3"),
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc([12])\.(weight|bias)$"), r"encoder.stages.\1.layers.\2.pwconv\3.\4"),
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(weight|gamma)$"), r"encoder.stages.\1.layers.\2.layer_scale_parameter"),
    (re.compile(r"^head\.norm\.(weight|bias)$"), r"layernorm.\1"),
    (re.compile(r"^(head\.(fc|pre_logits)\.|norm_pre\.)"), None),
]


def rename_timm_convnext(key: str) -> str | None:
    """A timm ConvNeXt key (no prefix) -> the `ConvNextModel` key, None for timm's head. Raises on a key
    that is neither (another architecture), naming it."""
    for pattern, repl in _TIMM_CONVNEXT_RULES:
        if pattern.search(key):
            return None if repl is None else pattern.sub(repl, key)
    raise ValueError(f"weight {key!r} is not a timm ConvNeXt weight")


def rename_llava_hr(key: str) -> str | None:
    """An original LLaVA-HR checkpoint key -> ours (table in the module docstring); None = skipped."""
    if key.startswith(_CLIP_PREFIX):
        return "vision_tower.clip." + key[len(_CLIP_PREFIX) :]
    if key.startswith(_CONVNEXT_PREFIX):
        inner = rename_timm_convnext(key[len(_CONVNEXT_PREFIX) :])
        return None if inner is None else "vision_tower.convnext." + inner
    if key.startswith(_TOWER + "align_stages_latent."):
        return "vision_tower.mr_adapters." + key[len(_TOWER + "align_stages_latent.") :]
    if key.startswith(_TOWER + "align_stages.0."):
        return "vision_tower.fusion." + key[len(_TOWER + "align_stages.0.") :]
    if key.startswith(("model.mm_projector.", "mm_projector.")):
        return _projector_rename(key)
    if key.startswith("model."):
        return "language_model." + key
    if key.startswith("lm_head."):
        return "language_model." + key
    return key  # load_weights names it as a weight the model does not have


# ----- geometry from a checkpoint ---------------------------------------------------------------------
def checkpoint_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """{key: shape} of every tensor in the weight files, without reading the tensors (safetensors
    headers; PyTorch .bin files memory-mapped)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    shapes[k] = tuple(h.get_slice(k).get_shape())
        else:
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            shapes.update({k: tuple(v.shape) for k, v in state.items()})
    return shapes


def _need(shapes: dict, key: str, where: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ValueError(f"{where}: weight {key!r} is missing; not an LLaVA-HR / CLIP / ConvNeXt checkpoint of the "
                         "expected layout")
    return shapes[key]


def _indices(shapes: dict, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def clip_config_from_shapes(shapes: dict, prefix: str, where: str) -> CLIPVisionConfig:
    """CLIP vision geometry from weight shapes: width and patch from the patch conv, native resolution from
    the position table, depth from the layer count, FFN width from fc1; heads of `CLIP_HEAD_DIM`."""
    d, _, p, _ = _need(shapes, prefix + "embeddings.patch_embedding.weight", where)
    n_pos = _need(shapes, prefix + "embeddings.position_embedding.weight", where)[0]
    layers = _indices(shapes, re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
    inter = _need(shapes, prefix + "encoder.layers.0.mlp.fc1.weight", where)[0]
    side = math.isqrt(n_pos - 1)
    if side * side != n_pos - 1 or d % CLIP_HEAD_DIM:
        raise ValueError(f"{where}: a CLIP tower with {n_pos} positions and width {d} is not a square-grid OpenAI "
                         f"CLIP ViT (pass vision_config= to give its geometry)")
    return CLIPVisionConfig(hidden_size=d, intermediate_size=inter, num_hidden_layers=len(layers),
                            num_attention_heads=d // CLIP_HEAD_DIM, image_size=side * p, patch_size=p,
                            hidden_act="quick_gelu")


def convnext_config_from_shapes(shapes: dict, prefix: str, name: str, where: str) -> ConvNextConfig:
    """ConvNeXt geometry from timm-named weight shapes: stage widths from each stage's first depthwise conv,
    depths from the block count, stem patch from the stem conv; LayerNorm eps from the timm model name
    (`convnext_xxlarge` is built with 1e-5, the others 1e-6)."""
    _, _, patch, _ = _need(shapes, prefix + "stem.0.weight", where)
    stages = _indices(shapes, re.escape(prefix) + r"stages\.(\d+)\.")
    widths, depths = [], []
    for i in stages:
        widths.append(_need(shapes, f"{prefix}stages.{i}.blocks.0.conv_dw.weight", where)[0])
        depths.append(len(_indices(shapes, re.escape(f"{prefix}stages.{i}.blocks.") + r"(\d+)\.")))
    scale = any(f"{prefix}stages.0.blocks.0.{n}" in shapes for n in ("weight", "gamma"))
    return ConvNextConfig(num_stages=len(stages), hidden_sizes=widths, depths=depths, patch_size=patch,
                          hidden_act="gelu", layer_scale_init_value=1e-6 if scale else 0.0,
                          layer_norm_eps=1e-5 if "xxlarge" in name else 1e-6)


def infer_vision_config(raw: dict, shapes: dict, where: str) -> LlavaHRVisionConfig:
    """The tower of an original LLaVA-HR checkpoint: branch geometries from the weights, input resolution
    from `input_image_size`, MR-adapters if the checkpoint has them (`freeze_vision: false` runs)."""
    clip = clip_config_from_shapes(shapes, _CLIP_PREFIX, where)
    convnext = convnext_config_from_shapes(shapes, _CONVNEXT_PREFIX, str(raw.get("vision_tower_slow", "")), where)
    adapters = any(k.startswith(_TOWER + "align_stages_latent.") for k in shapes)
    return LlavaHRVisionConfig(clip_config=clip, convnext_config=convnext,
                               image_size=int(raw.get("input_image_size") or 1024), mr_adapters=adapters)


# LlamaConfig fields an LLaVA-HR config.json carries (the rest are LLaVA's mm_* keys and training flags).
_LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "hidden_act", "rope_theta",
                 "rope_scaling", "attention_bias", "bos_token_id", "eos_token_id", "pad_token_id",
                 "tie_word_embeddings", "initializer_range")


def read_llava_hr_config(directory: Path) -> dict:
    """The raw `config.json` of an LLaVA-HR checkpoint, checked to be one (multi-path, mlp2x_gelu)."""
    file = directory / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing (every checkpoint directory needs its config.json)")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not JSON: {e}") from e
    if not isinstance(raw, dict) or not raw.get("is_multipath_encoder"):
        raise ValueError(f"{file}: not an LLaVA-HR checkpoint (needs is_multipath_encoder: true; a LLaVA-1.5 "
                         "checkpoint loads with dpn.loading)")
    if raw.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(f"{file}: mm_projector_type {raw.get('mm_projector_type')!r} is not supported; LLaVA-HR "
                         "uses 'mlp2x_gelu'")
    return raw


def _token_fields(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """image / router token ids from `tokenizer` (`dpn.tokenizer` adds `<image>`, `<ROUTER>`), or, without
    one, `<image>` one past the vocabulary: LLaVA-HR marks the image with -200, which never reaches the
    embeddings; ours is replaced before the lookup too."""
    if tokenizer is None:
        return {"image_token_id": vocab_size}
    from dpn.constants import IMAGE_TOKEN, ROUTER_TOKEN

    fields = {"image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}
    router_id = tokenizer.convert_tokens_to_ids(ROUTER_TOKEN)
    if router_id != tokenizer.unk_token_id:
        fields["router_token_id"] = router_id
    return fields


def _grow_vocab(model: DPNForConditionalGeneration, tokenizer: Any) -> None:
    if tokenizer is not None and len(tokenizer) > model.config.text_config.vocab_size:
        model.language_model.resize_token_embeddings(len(tokenizer))
        model.config.text_config.vocab_size = len(tokenizer)


def from_llava_hr(path: str | Path, dtype: torch.dtype | None = None, vision_config: LlavaHRVisionConfig | None = None,
                  tokenizer: Any = None, **overrides: Any) -> DPNForConditionalGeneration:
    """(a) A DPN model from an original LLaVA-HR checkpoint directory.

    Args:
        path: the directory (`config.json` + weights in LLaVA-HR's key names).
        dtype: dtype to build the model in (default torch's).
        vision_config: the tower's geometry; None = inferred (`infer_vision_config`).
        tokenizer: its `<image>` / `<ROUTER>` ids are used and the embeddings grow to its length.
        overrides: `DPNConfig` fields (compressor, dpe_layers, ...).
    """
    directory = _require_dir(path, "LLaVA-HR checkpoint")
    raw = read_llava_hr_config(directory)
    files = weight_files(directory)
    where = str(directory)
    if vision_config is None:
        vision_config = infer_vision_config(raw, checkpoint_shapes(files), where)
    text = LlamaConfig(**{k: raw[k] for k in _LLAMA_FIELDS if k in raw})
    fields: dict[str, Any] = dict(vision_config=vision_config, text_config=text, projector_hidden_act="gelu",
                                  **_token_fields(tokenizer, text.vocab_size))
    fields.update(overrides)
    model = _build_uninitialised(DPNConfig(**fields), dtype)
    load_weights(model, files, rename_llava_hr, fresh_prefixes=_HR_FRESH)
    _grow_vocab(model, tokenizer)
    return model.eval()


def _convnext_name(directory: Path) -> str:
    """The timm architecture named by a timm checkpoint's config.json ('' if none)."""
    file = directory / "config.json"
    if not file.is_file():
        return ""
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not JSON: {e}") from e
    return str(raw.get("architecture", "")) if isinstance(raw, dict) else ""


def _timm_prefix(shapes: dict) -> str:
    # timm hub files name the trunk directly; open_clip files nest it under `visual.trunk.`.
    return "visual.trunk." if any(k.startswith("visual.trunk.") for k in shapes) else ""


def load_convnext(model: DPNForConditionalGeneration, convnext_path: str | Path) -> None:
    """Copy a timm ConvNeXt checkpoint (a timm hub directory, or open_clip's `visual.trunk.` layout) into
    `model.vision_tower.convnext`. Raises naming the key on a missing weight or a shape mismatch."""
    directory = _require_dir(convnext_path, "ConvNeXt checkpoint")
    files = weight_files(directory)
    prefix = _timm_prefix(checkpoint_shapes(files))

    def rename(key: str) -> str | None:
        if not key.startswith(prefix):
            return None  # open_clip's text tower and projections
        inner = rename_timm_convnext(key[len(prefix) :])
        return None if inner is None else "vision_tower.convnext." + inner

    load_weights(model, files, rename, fresh_prefixes=("vision_tower.convnext.layernorm.",),
                 required_prefixes=("vision_tower.convnext.",))


def from_hr_components(
    llm_path: str | Path,
    clip_path: str | Path,
    convnext_path: str | Path,
    projector_path: str | Path | None = None,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    image_size: int = 1024,
    **overrides: Any,
) -> DPNForConditionalGeneration:
    """(b) An LLaVA-HR DPN model from its parts: a LLaMA-family LLM directory (Vicuna), a CLIP directory
    (CLIPModel or CLIPVisionModel), a timm ConvNeXt directory and optionally LLaVA-HR's stage-1 file
    (`mm_projector.bin`, a file or a directory holding it: projector + final fusion); otherwise those start
    fresh. The MR-adapters start as the identity; routers fresh. `image_size`: the input resolution."""
    llm_dir = _require_dir(llm_path, "LLM checkpoint")
    clip_dir = _require_dir(clip_path, "CLIP checkpoint")
    cnx_dir = _require_dir(convnext_path, "ConvNeXt checkpoint")
    clip = _read_config(clip_dir)
    clip = clip.vision_config if isinstance(clip, CLIPConfig) else clip
    if clip.model_type != "clip_vision_model":
        raise ValueError(f"{clip_dir / 'config.json'}: expected a CLIP vision model, got {clip.model_type!r}")
    cnx_files = weight_files(cnx_dir)
    shapes = checkpoint_shapes(cnx_files)
    convnext = convnext_config_from_shapes(shapes, _timm_prefix(shapes), _convnext_name(cnx_dir), str(cnx_dir))
    vision = LlavaHRVisionConfig(clip_config=clip, convnext_config=convnext, image_size=image_size)
    text = AutoConfig.from_pretrained(str(llm_dir), local_files_only=True)
    fields: dict[str, Any] = dict(vision_config=vision, text_config=text, **_token_fields(tokenizer, text.vocab_size))
    fields.update(overrides)
    model = _build_uninitialised(DPNConfig(**fields), dtype)
    load_weights(model, weight_files(llm_dir), _rename_llm, required_prefixes=("language_model.",))
    load_weights(model, weight_files(clip_dir), lambda k: _prefixed(_rename_vision(k), "vision_tower.clip."),
                 required_prefixes=("vision_tower.clip.",))
    load_convnext(model, cnx_dir)
    fresh: list[str] = ["vision_tower.mr_adapters."]
    if projector_path is not None:
        p = Path(projector_path)
        if p.is_dir():
            found = [p / n for n in ("mm_projector.bin", "multi_modal_projector.safetensors") if (p / n).is_file()]
            if not found:
                raise FileNotFoundError(f"{p}: no mm_projector.bin or multi_modal_projector.safetensors")
            p = found[0]
        elif not p.is_file():
            raise FileNotFoundError(f"projector weights {str(p)!r} do not exist")
        loaded = load_weights(model, [p], _projector_rename, required_prefixes=("multi_modal_projector.",))
        if not any(k.startswith("vision_tower.fusion.") for k in loaded):
            fresh.append("vision_tower.fusion.")
    else:
        fresh += ["vision_tower.fusion.", "multi_modal_projector."]
    for prefix in fresh:
        _reinit(model, prefix)
    _grow_vocab(model, tokenizer)
    return model


def _prefixed(key: str | None, prefix: str) -> str | None:
    # `_rename_vision` maps CLIP keys to `vision_tower.<key>`; HR's CLIP branch lives one level down.
    return None if key is None else prefix + key[len("vision_tower.") :]


def _reinit(model: DPNForConditionalGeneration, prefix: str) -> None:
    """Initialise the modules under `prefix` as a fresh model would (they were built uninitialised)."""
    module = model.get_submodule(prefix.rstrip("."))
    owner: Callable = model.vision_tower._init_weights if prefix.startswith("vision_tower.") else model._init_weights
    for m in module.modules():
        owner(m)


__all__ = [
    "checkpoint_shapes",
    "clip_config_from_shapes",
    "convnext_config_from_shapes",
    "from_hr_components",
    "from_llava_hr",
    "infer_vision_config",
    "load_convnext",
    "read_llava_hr_config",
    "rename_llava_hr",
    "rename_timm_convnext",
]
