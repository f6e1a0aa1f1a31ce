"""FLOPs of a DPN / LLaVA-1.5 forward at prefill, from the real per-layer token counts of each sample.

The model reports, per sample, how many visual and text tokens each decoder layer takes as input
(`DPNOutput.visual_tokens_per_layer` / `text_tokens_per_layer`, (B, num_layers)); everything here turns
such counts into FLOPs. `analytic_token_counts` reproduces the same counts without weights (pyramid,
FastV and PDrop arithmetic), so `dpn flops` can price any routing path on any geometry.

Two conventions for the LLM, both per decoder layer on n tokens (d hidden, m FFN size):

"fastv" -- the FastV / PyramidDrop convention, the headline number (it is what those papers and the
    DPN comparison tables use):  4nd^2 + 2n^2d + 2ndm.
    It counts ONE FLOP PER MULTIPLY-ACCUMULATE of: the q/k/v/o projections as full d x d matrices (4nd^2,
    i.e. multi-head attention, no GQA), QK^T and AV over all n x n pairs (2n^2d), and a TWO-matrix FFN
    (2ndm) -- LLaMA's SwiGLU gate matrix is not counted. Decoder layers only: no lm_head, no vision.

"exact" -- the matmul FLOPs a LLaMA decoder layer really executes at prefill, 2 FLOPs per MAC
    (H query heads, KV key/value heads, head size hd):
        q_proj  n x d  @ d x H*hd        2 n d H hd
        k_proj  n x d  @ d x KV*hd       2 n d KV hd       (GQA: KV <= H)
        v_proj  n x d  @ d x KV*hd       2 n d KV hd
        QK^T    per head n x hd @ hd x n 2 n^2 hd  x H     (K/V heads are broadcast to the H query heads)
        AV      per head n x n  @ n x hd 2 n^2 hd  x H
        o_proj  n x H*hd @ H*hd x d      2 n H hd d
        SwiGLU  gate, up: n x d @ d x m; down: n x m @ m x d     3 * 2 n d m
    Attention is counted over the full n x n score matrix, as dense SDPA / eager attention computes it
    (the causal mask zeroes half of it after the fact). Excluded, all O(n d) and < 0.1% at 7B: RMSNorm,
    rotary embedding, softmax, SiLU and the gate*up product, residual adds, bias adds, embedding lookup.
    This is what `torch.utils.flop_counter.FlopCounterMode` reports for an HF `LlamaDecoderLayer`
    (see `flop_counter_mode` for the one registration it needs on CPU).
    With H*hd = d and KV = H:  exact = 2 * (4nd^2 + 2n^2d + 3ndm), about 2.5x "fastv" at 7B.

The vision tower, projector and lm_head are reported separately and always exactly (2 per MAC); they
are never part of the LLM headline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dpn.compressors import COMPRESSORS, POOLING
from dpn.geometry import kept_count, pooled_grid

CONVENTIONS = ("fastv", "exact")
ANALYTIC_COMPRESSORS = COMPRESSORS
TERA = 1e12


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"FLOPs convention must be one of {CONVENTIONS}, got {convention!r}")


def _head_dim(text_config: Any) -> int:
    hd = getattr(text_config, "head_dim", None)
    return int(hd) if hd else text_config.hidden_size // text_config.num_attention_heads


# ----- LLM -----------------------------------------------------------------------------------------
def llm_layer_flops(n: int, text_config: Any, convention: str = "fastv") -> float:
    """FLOPs of one LLaMA decoder layer at prefill on `n` tokens (see the module docstring for both
    conventions). `text_config` is a `LlamaConfig`-like object."""
    _check_convention(convention)
    n = int(n)
    if n < 0:
        raise ValueError(f"token count must be >= 0, got {n}")
    d = text_config.hidden_size
    m = text_config.intermediate_size
    if convention == "fastv":
        return float(4 * n * d * d + 2 * n * n * d + 2 * n * d * m)
    h = text_config.num_attention_heads
    kv = getattr(text_config, "num_key_value_heads", None) or h
    hd = _head_dim(text_config)
    proj = 2 * n * d * (h * hd) * 2 + 2 * n * d * (kv * hd) * 2  # q and o; k and v
    attn = 2 * (2 * n * n * hd * h)  # QK^T and AV over the full n x n
    mlp = 3 * 2 * n * d * m  # SwiGLU: gate, up, down
    return float(proj + attn + mlp)


def llm_prefill_flops(text_config: Any, tokens_per_layer: Sequence[int], convention: str = "fastv") -> float:
    """FLOPs of all decoder layers at prefill; `tokens_per_layer[i]` is the input length of layer i
    (visual + text). Excludes the lm_head (see `lm_head_flops`)."""
    counts = [int(n) for n in tokens_per_layer]
    if len(counts) != text_config.num_hidden_layers:
        raise ValueError(
            f"tokens_per_layer needs one count per decoder layer ({text_config.num_hidden_layers}), got {len(counts)}"
        )
    return float(sum(llm_layer_flops(n, text_config, convention) for n in counts))


def lm_head_flops(text_config: Any, n_positions: int = 1) -> float:
    """Exact FLOPs of the lm_head on `n_positions` positions: 2 * n * d * V. Generation needs the logits
    of the last prompt position only (n = 1); a training forward computes all of them."""
    return float(2 * int(n_positions) * text_config.hidden_size * text_config.vocab_size)


# ----- vision tower and projector --------------------------------------------------------------------
def vision_tower_flops(vision_config: Any, upto_layer: int | None = -2, n_images: int = 1) -> float:
    """Exact FLOPs of the CLIP vision tower on `n_images` images.

    Patch embedding (a conv with kernel = stride = p on 3 channels): 2 * P * (3 p^2) * D for P patches;
    each encoder layer on N = P + 1 tokens (CLS included): q/k/v/o 4 * 2 N D^2, attention 4 N^2 D,
    MLP (2 matrices) 2 * 2 N D I. Layer norms, activations and biases excluded.

    `upto_layer` picks the hidden state the LLM reads (`hidden_states[upto_layer]`, LLaVA uses -2) and
    counts only the layers that feed it: L - 1 of L for -2. `None` counts all L layers, which is what an
    HF `CLIPVisionModel` forward runs even when only layer -2 is read.
    """
    n_layers = vision_config.num_hidden_layers
    if upto_layer is None:
        used = n_layers
    else:
        # hidden_states has L + 1 entries: the embeddings, then the output of each layer.
        used = upto_layer if upto_layer >= 0 else n_layers + 1 + upto_layer
        if not 0 <= used <= n_layers:
            raise ValueError(f"upto_layer must index hidden_states of a {n_layers}-layer tower, got {upto_layer}")
    D = vision_config.hidden_size
    inter = vision_config.intermediate_size
    p = vision_config.patch_size
    channels = getattr(vision_config, "num_channels", 3)
    P = (vision_config.image_size // p) ** 2
    N = P + 1
    embed = 2 * P * channels * p * p * D
    layer = 4 * 2 * N * D * D + 4 * N * N * D + 2 * 2 * N * D * inter
    return float(n_images * (embed + used * layer))


def hr_vision_flops(vision_config: Any, n_images: int = 1) -> dict[str, float]:
    """Exact FLOPs of LLaVA-HR's dual-resolution tower (`dpn.vision_hr`) on `n_images` images, by part
    (2 FLOPs per MAC, as `torch.utils.flop_counter`; resizing, norms, activations and biases excluded).

    S = input size, g = token grid side (N = g^2 tokens), D / I = CLIP width / FFN, L = CLIP layers,
    C_i / H_i = ConvNeXt stage width / map side (H_i = S / (p 2^i)), h = last map side, C = C_last:
      clip:        patch conv 2 N (3 p_c^2) D; each of the L layers on N tokens (LLaVA-HR drops CLS before
                   the encoder and runs every layer): q/k/v/o 8 N D^2, attention 4 N^2 D, MLP 4 N D I.
      convnext:    stem 2 (S/p)^2 (3 p^2) C_0; downsample of stage i > 0: 2 H_i^2 (4 C_{i-1}) C_i; each block:
                   depthwise 7x7 2 H^2 C 49, the two pointwise Linears (4x) 16 H^2 C^2.
      mr_adapters: each: slow 1x1 convs 2 h^2 C^2 + 2 h^2 C D (before aligning to the CLIP grid), depthwise
                   7x7 on the CLIP grid 2 N D 49, fast 1x1 conv 2 N D^2, gate 2 (2D)(D/2) + 2 (D/2).
      fusion:      2 N D^2 + 2 N C D (the ConvNeXt tokens are aligned to the N-token grid first).
    At LLaVA-HR-7B (1024 px, CLIP-L at 448 px, ConvNeXt-L): ~0.73 + ~1.45 TFLOPs per image.
    """
    clip, cnx = vision_config.clip_config, vision_config.convnext_config
    S, g = vision_config.image_size, vision_config.grid
    N, D, I, L, pc = g * g, clip.hidden_size, clip.intermediate_size, clip.num_hidden_layers, clip.patch_size
    out = {"clip": 2 * N * 3 * pc * pc * D + L * (8 * N * D * D + 4 * N * N * D + 4 * N * D * I)}
    p, widths = cnx.patch_size, cnx.hidden_sizes
    conv = 2 * (S // p) ** 2 * 3 * p * p * widths[0]
    for i, (c, depth) in enumerate(zip(widths, cnx.depths, strict=True)):
        side = S // (p * 2**i)
        if i > 0:
            conv += 2 * side * side * 4 * widths[i - 1] * c
        conv += depth * (2 * side * side * c * 49 + 16 * side * side * c * c)
    out["convnext"] = conv
    h, C = vision_config.slow_grid, widths[-1]
    adapter = 2 * h * h * C * C + 2 * h * h * C * D + 2 * N * D * 49 + 2 * N * D * D + 2 * 2 * D * (D // 2) + 2 * (D // 2)
    out["mr_adapters"] = (3 * adapter) if vision_config.mr_adapters else 0
    out["fusion"] = 2 * N * D * D + 2 * N * C * D
    return {k: float(n_images * v) for k, v in out.items()}


def vision_flops_by_part(config: Any) -> dict[str, float]:
    """Exact vision-tower FLOPs of one image, by part: LLaVA-HR's clip / convnext / mr_adapters / fusion, or
    LLaVA-1.5's CLIP up to `config.vision_feature_layer`."""
    from dpn.configuration_hr import is_hr_vision  # a config object exists, so transformers is loaded already

    if is_hr_vision(config.vision_config):
        return hr_vision_flops(config.vision_config)
    return {"clip": vision_tower_flops(config.vision_config, config.vision_feature_layer)}


def projector_flops(config: Any, n_features: int | None = None) -> float:
    """Exact FLOPs of LLaVA's 2-layer MLP projector on `n_features` image features (default: the
    config's `num_image_tokens`, 576 at 7B): 2 P Dv Dt + 2 P Dt^2."""
    P = config.num_image_tokens if n_features is None else int(n_features)
    dv = config.vision_config.hidden_size
    dt = config.text_config.hidden_size
    return float(2 * P * dv * dt + 2 * P * dt * dt)


# ----- token counts without weights ----------------------------------------------------------------
def _start_grid(config: Any) -> tuple[int, int]:
    # Mirrors the model: the "default" strategy drops CLS and keeps the h x w patch grid; "full" keeps a
    # 1 x (h*w + 1) strip (which the pyramid refuses to pool anyway).
    if config.vision_feature_select_strategy == "default":
        return tuple(config.vision_grid)
    return 1, config.num_image_tokens


def check_path(config: Any, path: Sequence[int]) -> list[int]:
    """Validate a routing path (compression factor per DPE layer); returns it as a list of ints."""
    factors = config.expert_factors
    n_dpe = len(config.dpe_layers)
    path = list(path)
    if len(path) != n_dpe:
        raise ValueError(
            f"path {path} needs one compression factor per DPE layer {config.dpe_layers}: {n_dpe} values, "
            f"each one of {factors}"
        )
    bad = [f for f in path if not isinstance(f, int) or f not in factors]
    if bad:
        raise ValueError(
            f"path {path}: {bad} not an expert's compression factor; valid factors are {factors} "
            f"(experts {config.experts}: 1 keep, 2 = (1,2), 4 = (2,2))"
        )
    return path


def analytic_token_counts(
    config: Any,
    n_text: int,
    path: Sequence[int] | None = None,
    compressor: str | None = None,
    grid: tuple[int, int] | None = None,
) -> tuple[list[int], list[int]]:
    """(visual_per_layer, text_per_layer): the input token counts of every decoder layer for one sample
    with `n_text` text tokens and one image, as the model produces them at prefill.

    Args:
        config: a `DPNConfig`.
        n_text: text tokens of the sample (never compressed by any method here).
        path: compression factor at each DPE layer (1 keep, 2 = (1,2), 4 = (2,2)); required for "dpn",
            overrides `config.static_path` for "static", must be None otherwise.
        compressor: one of `dpn.compressors.COMPRESSORS`; None = `config.compressor`.
        grid: the sample's starting (h, w) visual grid; None = the config's (24 x 24 at 7B); (0, 0) for a
            text-only sample.

    Rules, matching `DPNForConditionalGeneration`:
        dpn / static: at DPE layer k the grid is pooled with kernel = stride = the chosen expert's
            (kh, kw), floor division (`dpn.geometry.pooled_grid`); a grid with fewer than
            `config.min_tokens_to_pool` tokens is left alone. location "post": layers after k see the
            pooled count; "pre": layer k itself does.
        fastv: the first `config.fastv_layer` layers (0 .. K-1) see every visual token, layers K onwards
            keep floor(n * (1 - fastv_ratio)) (`dpn.geometry.kept_count`) -- FastV's code prunes on
            entering layer K, and its FLOPs formula K * full + (T - K) * pruned assumes the same.
        pdrop: on entering each layer of `config.pdrop_layers`, floor(n * pdrop_ratio) of the remaining
            visual tokens are kept (576 -> 288 -> 144 -> 72 at layers 8 / 16 / 24 of 32).
    """
    compressor = config.compressor if compressor is None else compressor
    if compressor not in ANALYTIC_COMPRESSORS:
        raise ValueError(f"compressor must be one of {ANALYTIC_COMPRESSORS}, got {compressor!r}")
    if n_text < 0:
        raise ValueError(f"n_text must be >= 0, got {n_text}")
    if compressor in ("dpn", "random") and path is None:
        raise ValueError(f"compressor {compressor!r} needs a path: one compression factor per DPE layer, e.g. 4-2-1")
    if compressor not in POOLING and path is not None:
        raise ValueError(f"a path only applies to compressors {POOLING}, got compressor {compressor!r}")
    if compressor == "static" and path is None:
        path = config.static_path
    if path is not None:
        path = check_path(config, path)

    n_layers = config.text_config.num_hidden_layers
    h, w = _start_grid(config) if grid is None else (int(grid[0]), int(grid[1]))
    n_vis = h * w
    visual: list[int] = []
    if compressor in POOLING:
        dpe = {layer: k for k, layer in enumerate(config.dpe_layers)}

        def pool(h: int, w: int, layer: int) -> tuple[int, int]:
            if h * w < config.min_tokens_to_pool:
                return h, w
            kernel = config.experts[config.expert_index(path[dpe[layer]])]
            return pooled_grid(h, w, kernel)

        for i in range(n_layers):
            if i in dpe and config.location == "pre":
                h, w = pool(h, w, i)
            visual.append(h * w)
            if i in dpe and config.location == "post":
                h, w = pool(h, w, i)
    elif compressor == "fastv":
        pruned = kept_count(n_vis, 1.0 - config.fastv_ratio)
        visual = [n_vis if i < config.fastv_layer else pruned for i in range(n_layers)]
    elif compressor == "pdrop":
        for i in range(n_layers):
            if i in config.pdrop_layers:
                n_vis = kept_count(n_vis, config.pdrop_ratio)
            visual.append(n_vis)
    else:
        visual = [n_vis] * n_layers
    return visual, [int(n_text)] * n_layers


# ----- reports -------------------------------------------------------------------------------------
def _as_rows(x: Any) -> list[list[int]]:
    rows = x.tolist() if hasattr(x, "tolist") else x
    rows = [list(r) for r in rows]
    return [[int(v) for v in r] for r in rows]


def per_sample_tflops(
    text_config: Any, visual_per_layer: Any, text_per_layer: Any, convention: str = "fastv"
) -> list[float]:
    """LLM prefill TFLOPs of each sample from the model's (B, num_layers) count tensors (or nested lists);
    used for the `flops/prefill_tflops_per_sample` metrics of training and evaluation."""
    vis, txt = _as_rows(visual_per_layer), _as_rows(text_per_layer)
    if len(vis) != len(txt):
        raise ValueError(f"visual and text counts cover different batch sizes: {len(vis)} vs {len(txt)}")
    out = []
    for v, t in zip(vis, txt, strict=True):
        if len(v) != len(t):
            raise ValueError(f"visual and text counts cover different layer counts: {len(v)} vs {len(t)}")
        out.append(llm_prefill_flops(text_config, [a + b for a, b in zip(v, t, strict=True)], convention) / TERA)
    return out


def flops_report(
    config: Any,
    visual_per_layer: Sequence[int],
    text_per_layer: Sequence[int],
    baseline_visual_per_layer: Sequence[int] | None = None,
    baseline_text_per_layer: Sequence[int] | None = None,
) -> dict[str, Any]:
    """FLOPs of one sample, with the uncompressed LLaVA-1.5 baseline on the same input.

    The baseline defaults to every layer seeing the full image (`config.num_image_tokens` if the sample
    has visual tokens at all) and layer 0's text count. Returns a JSON-ready dict:
        tflops / tflops_exact: LLM prefill (decoder layers), "fastv" convention (the headline) / exact;
        baseline_tflops / baseline_tflops_exact: the same for the baseline;
        saving / saving_exact: 1 - tflops / baseline_tflops, in [0, 1];
        vision_tflops, projector_tflops, lm_head_tflops: exact, 0 for a text-only sample; the vision
            tower counted up to `config.vision_feature_layer` (LLaVA-HR: both branches, `hr_vision_flops`),
            the lm_head on the last position only; vision_tflops_by_part: the vision tower by part;
        visual_tokens_per_layer, text_tokens_per_layer, baseline_visual_tokens_per_layer.
    """
    text_config = config.text_config
    vis = [int(v) for v in visual_per_layer]
    txt = [int(t) for t in text_per_layer]
    has_image = max(vis, default=0) > 0
    if baseline_visual_per_layer is None:
        baseline_visual_per_layer = [config.num_image_tokens if has_image else 0] * len(vis)
    if baseline_text_per_layer is None:
        baseline_text_per_layer = [txt[0] if txt else 0] * len(txt)
    base_vis = [int(v) for v in baseline_visual_per_layer]
    base_txt = [int(t) for t in baseline_text_per_layer]
    if not (len(vis) == len(txt) == len(base_vis) == len(base_txt)):
        raise ValueError("visual, text and baseline counts must all have one entry per decoder layer")
    n = [a + b for a, b in zip(vis, txt, strict=True)]
    n_base = [a + b for a, b in zip(base_vis, base_txt, strict=True)]

    report: dict[str, Any] = {}
    for suffix, conv in (("", "fastv"), ("_exact", "exact")):
        ours = llm_prefill_flops(text_config, n, conv)
        base = llm_prefill_flops(text_config, n_base, conv)
        report[f"tflops{suffix}"] = ours / TERA
        report[f"baseline_tflops{suffix}"] = base / TERA
        report[f"saving{suffix}"] = 1.0 - ours / base if base > 0 else 0.0
    parts = vision_flops_by_part(config) if has_image else {}
    report["vision_tflops"] = sum(parts.values()) / TERA
    report["vision_tflops_by_part"] = {k: v / TERA for k, v in parts.items()}
    report["projector_tflops"] = projector_flops(config) / TERA if has_image else 0.0
    report["lm_head_tflops"] = lm_head_flops(text_config, 1) / TERA
    report["visual_tokens_per_layer"] = vis
    report["text_tokens_per_layer"] = txt
    report["baseline_visual_tokens_per_layer"] = base_vis
    return report


def flop_counter_mode(display: bool = False, depth: int = 2):
    """A `torch.utils.flop_counter.FlopCounterMode` that also counts CPU scaled-dot-product attention.

    On CPU, `F.scaled_dot_product_attention` (HF's default "sdpa" attention) dispatches to
    `aten._scaled_dot_product_flash_attention_for_cpu`, which the stock counter does not know and would
    count as 0; we register it with the same formula torch uses for the CUDA SDPA kernels (full n x n,
    GQA-aware).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    return FlopCounterMode(display=display, depth=depth, custom_mapping={op: cpu_sdpa_flop})


__all__ = [
    "ANALYTIC_COMPRESSORS",
    "CONVENTIONS",
    "analytic_token_counts",
    "check_path",
    "flop_counter_mode",
    "flops_report",
    "hr_vision_flops",
    "kept_count",
    "lm_head_flops",
    "llm_layer_flops",
    "llm_prefill_flops",
    "per_sample_tflops",
    "pooled_grid",
    "projector_flops",
    "vision_flops_by_part",
    "vision_tower_flops",
]
