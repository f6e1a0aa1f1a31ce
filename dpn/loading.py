"""Loading real weights from local paths, the three ways users start:

(a) `from_llava_hf(dir, compressor="dpn", ...)`: a llava-hf `LlavaForConditionalGeneration` checkpoint
    (e.g. llava-1.5-7b-hf); DPN fields as keyword overrides, routers freshly initialised.
(b) `from_components(llm_dir, vision_dir, projector=None, tokenizer=None, ...)`: a LLaMA-family LLM
    (Vicuna), a CLIP vision model and optionally a stage-1 projector (LLaVA's `mm_projector.bin` or ours).
(c) our own checkpoints: `DPNForConditionalGeneration.from_pretrained(dir)` (HF, safetensors).
`load_vision_tower(model, dir)` copies a CLIP vision model into an existing model (the tiny recipe's
random model takes its stage-0 vision tower this way).

Nothing is downloaded: every path must be a local directory. A bad path, a missing or unexpected weight
or a shape mismatch raises an error naming the file and the key.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, CLIPConfig, PreTrainedConfig
from transformers.initialization import no_init_weights

from dpn.configuration_dpn import DPNConfig
from dpn.modeling_dpn import DPNForConditionalGeneration

logger = logging.getLogger(__name__)

# Weights that a model built from pretrained parts legitimately lacks: the DPN-only modules.
_FRESH_PREFIXES = ("routers.", "pool_experts.")

# llava-hf checkpoints as published (vision tower under `vision_model`) and as transformers 5 may name them.
_LLAVA_KEY_RULES = [
    (re.compile(r"^vision_tower\.vision_model\."), "vision_tower."),
    (re.compile(r"^model\.vision_tower\."), "vision_tower."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
]

# Buffers some older checkpoints persist; the model recomputes them.
_IGNORED_KEY = re.compile(r"(position_ids|rotary_emb\.inv_freq)$")


def _require_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} must be a local directory; {str(p)!r} is not one (nothing is downloaded)")
    return p


def weight_files(directory: Path) -> list[Path]:
    """The safetensors (or, failing that, PyTorch .bin) files of a checkpoint directory."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from e
        files = sorted({directory / f for f in weight_map.values()})
    elif (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    else:
        files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{directory}: no weights found (expected model.safetensors, a safetensors index or *.bin)")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: listed in the checkpoint index but missing")
    return files


def _iter_tensors(file: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(key, loader) pairs of one weight file; tensors are read lazily, one at a time."""
    if file.suffix == ".safetensors":
        try:
            handle = safe_open(str(file), framework="pt")
        except Exception as e:  # corrupt or truncated file
            raise ValueError(f"{file}: cannot be read as safetensors: {e}") from e
        with handle as f:
            for key in f.keys():
                yield key, (lambda k=key, f=f: f.get_tensor(k))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
        for key, tensor in state.items():
            yield key, (lambda t=tensor: t)


def load_weights(
    model: torch.nn.Module,
    files: list[Path],
    rename: Callable[[str], str | None],
    fresh_prefixes: tuple[str, ...] = (),
    required_prefixes: tuple[str, ...] | None = None,
) -> dict[str, Path]:
    """Copy weights from `files` into `model`, key by key.

    `rename` maps a checkpoint key to a model key, or None to skip it (weights of another model in the
    same file, e.g. CLIP's text tower). Returns {model key: file}. Raises on a key the model does not
    have, a shape mismatch, or (for model keys starting with `required_prefixes`, default all) a weight
    no file provided, unless it starts with one of `fresh_prefixes`.
    """
    params = model.state_dict(keep_vars=True)
    loaded: dict[str, Path] = {}
    for file in files:
        for key, get in _iter_tensors(file):
            if _IGNORED_KEY.search(key):
                continue
            name = rename(key)
            if name is None:
                continue
            if name not in params:
                raise ValueError(f"{file}: weight {key!r} (as {name!r}) does not exist in {type(model).__name__}")
            tensor = get()
            target = params[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(
                    f"{file}: weight {key!r} has shape {tuple(tensor.shape)} but the model's {name!r} is "
                    f"{tuple(target.shape)} (config does not match the checkpoint)"
                )
            with torch.no_grad():
                target.copy_(tensor.to(target.dtype))
            loaded[name] = file
    tied = _tied_keys(model)
    missing = [
        k
        for k in params
        if k not in loaded
        and k not in tied
        and not k.startswith(fresh_prefixes)
        and (required_prefixes is None or k.startswith(required_prefixes))
        and not _IGNORED_KEY.search(k)
    ]
    if missing:
        where = ", ".join(str(f) for f in files)
        raise ValueError(f"{where}: no weight for {len(missing)} model key(s), e.g. {missing[:5]}")
    return loaded


def _tied_keys(model: torch.nn.Module) -> set[str]:
    lm = getattr(model, "language_model", model)
    if getattr(lm.config, "tie_word_embeddings", False):
        return {"language_model.lm_head.weight", "lm_head.weight"}
    return set()


def _rename_llava(key: str) -> str:
    for pattern, repl in _LLAVA_KEY_RULES:
        if pattern.search(key):
            return pattern.sub(repl, key, count=1)
    return key


def _build_uninitialised(config: DPNConfig, dtype: torch.dtype | None) -> DPNForConditionalGeneration:
    """A model whose pretrained parts are left uninitialised (they are overwritten next) and whose
    DPN-only parts are initialised fresh."""
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            model = DPNForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    for name in ("routers", "pool_experts"):
        if hasattr(model, name):
            getattr(model, name).apply(model._init_weights)
    return model


def _read_config(directory: Path) -> PreTrainedConfig:
    file = directory / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing (every checkpoint directory needs its config.json)")
    try:
        return AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:
        raise ValueError(f"{file}: cannot be read as a transformers config: {e}") from e


def from_llava_hf(path: str | Path, dtype: torch.dtype | None = None, **overrides: Any) -> DPNForConditionalGeneration:
    """(a) Build a DPN model from a llava-hf checkpoint directory; DPN fields as keyword overrides."""
    directory = _require_dir(path, "llava-hf checkpoint")
    llava = _read_config(directory)
    if llava.model_type != "llava":
        raise ValueError(f"{directory / 'config.json'}: model_type is {llava.model_type!r}, expected 'llava'")
    fields = dict(
        vision_config=llava.vision_config,
        text_config=llava.text_config,
        image_token_id=llava.image_token_id,
        projector_hidden_act=llava.projector_hidden_act,
        vision_feature_layer=llava.vision_feature_layer,
        vision_feature_select_strategy=llava.vision_feature_select_strategy,
        multimodal_projector_bias=llava.multimodal_projector_bias,
    )
    if not isinstance(fields["vision_feature_layer"], int):
        raise ValueError(
            f"{directory / 'config.json'}: vision_feature_layer {llava.vision_feature_layer} (several layers) is not "
            "supported; LLaVA-1.5 uses -2"
        )
    fields.update(overrides)
    config = DPNConfig(**fields)
    model = _build_uninitialised(config, dtype)
    load_weights(model, weight_files(directory), _rename_llava, fresh_prefixes=_FRESH_PREFIXES)
    routers = getattr(model, "routers", None)  # built for compressor="dpn" only
    if routers is not None:
        # The one thing worth saying: llava-hf checkpoints have no routers, so dpn routing is random until trained.
        logger.warning("%s: loaded as DPN; its %d routers start untrained (train stage 2 or route_calibrate "
                       "before routing with compressor='dpn')", directory, len(routers))
    return model.eval()


def _projector_rename(key: str) -> str:
    # LLaVA-HR's stage-1 file also holds the final fusion of its two vision branches (`dpn.vision_hr`).
    if key.startswith(("model.vision_tower.align_stages.0.", "vision_tower.align_stages.0.")):
        return "vision_tower.fusion." + key.split("align_stages.0.", 1)[1]
    # LLaVA's stage-1 output (`mm_projector.bin`): model.mm_projector.{0,2}.* = Linear, GELU, Linear.
    m = re.match(r"^(?:model\.)?mm_projector\.([02])\.(weight|bias)$", key)
    if m:
        linear = "linear_1" if m.group(1) == "0" else "linear_2"
        return f"multi_modal_projector.{linear}.{m.group(2)}"
    return key if key.startswith("multi_modal_projector.") else f"multi_modal_projector.{key}"


def _rename_vision(key: str) -> str | None:
    # A CLIPModel (e.g. openai/clip-vit-large-patch14-336) keeps the tower under `vision_model.`;
    # a CLIPVisionModel saved by transformers 5 has no prefix.
    if key.startswith("vision_model."):
        return "vision_tower." + key[len("vision_model.") :]
    if key.startswith(("text_model.", "visual_projection.", "text_projection.", "logit_scale")):
        return None  # CLIP's text tower and projections: not part of the vision tower
    return "vision_tower." + key


def load_vision_tower(model: DPNForConditionalGeneration, vision_path: str | Path) -> None:
    """Copy a CLIP vision model's weights (a CLIPModel or CLIPVisionModel directory) into
    `model.vision_tower`. Raises naming the key on a missing weight or a shape mismatch (another geometry)."""
    vision_dir = _require_dir(vision_path, "vision tower checkpoint")
    load_weights(model, weight_files(vision_dir), _rename_vision, required_prefixes=("vision_tower.",))


def _rename_llm(key: str) -> str:
    return f"language_model.{key}"


def load_language_model(model: DPNForConditionalGeneration, llm_path: str | Path, tokenizer: Any = None) -> None:
    """Copy a LLaMA-family causal LM's weights (a `save_pretrained` directory) into `model.language_model`.
    With a `tokenizer`, a tokenizer saved in that directory must have the same vocabulary (else the
    embedding rows would mean other tokens). Raises naming the key on a missing weight or a shape mismatch."""
    llm_dir = _require_dir(llm_path, "LLM checkpoint")
    if tokenizer is not None and (llm_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        own = AutoTokenizer.from_pretrained(str(llm_dir), local_files_only=True).get_vocab()
        if own != tokenizer.get_vocab():
            raise ValueError(f"{llm_dir}: the LLM's tokenizer ({len(own)} tokens) is not the one given "
                             f"({len(tokenizer)} tokens, {getattr(tokenizer, 'name_or_path', '?')!r}); its "
                             "embedding rows would mean other tokens")
    load_weights(model, weight_files(llm_dir), _rename_llm, required_prefixes=("language_model.",))


def from_components(
    llm_path: str | Path,
    vision_path: str | Path,
    projector_path: str | Path | None = None,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> DPNForConditionalGeneration:
    """(b) Build a DPN model from a LLaMA-family LLM, a CLIP vision model and optionally a stage-1
    projector (a file or a directory holding `mm_projector.bin` or `multi_modal_projector.safetensors`).

    With a `tokenizer`, its `<image>`/`<ROUTER>`/pad ids are used and the LLM's embeddings are resized to
    its length (rows for new special tokens are initialised by transformers' mean-resizing).
    """
    llm_dir = _require_dir(llm_path, "LLM checkpoint")
    vision_dir = _require_dir(vision_path, "vision tower checkpoint")
    text_config = _read_config(llm_dir)
    vision_config = _read_config(vision_dir)
    if isinstance(vision_config, CLIPConfig):
        vision_config = vision_config.vision_config
    if vision_config.model_type != "clip_vision_model":
        raise ValueError(f"{vision_dir / 'config.json'}: expected a CLIP vision model, got {vision_config.model_type!r}")
    fields: dict[str, Any] = dict(vision_config=vision_config, text_config=text_config)
    if tokenizer is not None:
        from dpn.constants import IMAGE_TOKEN, ROUTER_TOKEN

        fields["image_token_id"] = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        router_id = tokenizer.convert_tokens_to_ids(ROUTER_TOKEN)
        if router_id != tokenizer.unk_token_id:
            fields["router_token_id"] = router_id
    fields.update(overrides)
    config = DPNConfig(**fields)
    model = _build_uninitialised(config, dtype)

    load_weights(model, weight_files(llm_dir), _rename_llm, required_prefixes=("language_model.",))
    load_vision_tower(model, vision_dir)
    if projector_path is not None:
        p = Path(projector_path)
        if p.is_dir():
            candidates = [p / "mm_projector.bin", p / "multi_modal_projector.safetensors", p / "mm_projector.safetensors"]
            found = [c for c in candidates if c.is_file()]
            if not found:
                raise FileNotFoundError(f"{p}: no projector weights (looked for {[c.name for c in candidates]})")
            p = found[0]
        elif not p.is_file():
            raise FileNotFoundError(f"projector weights {str(p)!r} do not exist")
        load_weights(model, [p], _projector_rename, required_prefixes=("multi_modal_projector.",))
    else:
        model.multi_modal_projector.apply(model._init_weights)
    if tokenizer is not None and len(tokenizer) != model.config.text_config.vocab_size:
        model.language_model.resize_token_embeddings(len(tokenizer))
        model.config.text_config.vocab_size = len(tokenizer)
    return model


def save_projector(model: DPNForConditionalGeneration, path: str | Path) -> Path:
    """Write the projector alone (`multi_modal_projector.safetensors`), the stage-1 artifact."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    file = out / "multi_modal_projector.safetensors"
    state = {f"multi_modal_projector.{k}": v.detach().cpu().contiguous() for k, v in model.multi_modal_projector.state_dict().items()}
    save_file(state, str(file))
    return file
