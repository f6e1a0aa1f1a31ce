"""DPN configuration: a LLaVA-1.5 configuration (vision / text / projector sub-configs) plus the pyramid.

The pyramid fields are flat on `DPNConfig` so the whole model configuration serialises to one
`config.json` beside the safetensors weights, exactly as HF models do. Values are validated eagerly
in `__post_init__`: a bad value fails at construction, naming the field and what would be valid.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from dpn.compressors import COMPRESSORS, POOLING, ROUTER_OBJECTIVES, format_path, parse_path
from dpn.configuration_hr import hr_vision_config

POOL_FUNCTIONS = ("max", "avg", "conv")
LOCATIONS = ("post", "pre")
ROUTER_VERSIONS = ("mlp", "linear")

# (kh, kw) pooling kernels of the three Dynamic Pooling Experts: keep, halve the width, quarter.
DEFAULT_EXPERTS = ((1, 1), (1, 2), (2, 2))


def default_dpe_layers(num_layers: int) -> list[int]:
    """DPE layers end each quarter of the depth: 7/15/23 of 32, 1/3/5 of 8 (0-based)."""
    if num_layers < 4:
        raise ValueError(f"DPN needs an LLM with at least 4 layers to place 3 DPE layers, got num_layers={num_layers}")
    q = num_layers / 4
    return [int(round(q * i)) - 1 for i in (1, 2, 3)]


def expert_factor(kernel: tuple[int, int] | list[int]) -> int:
    """Compression factor of an expert: the number of tokens one pooled token replaces (kh * kw)."""
    return int(kernel[0]) * int(kernel[1])


_FLOAT_FIELDS = ("gate_temperature", "route_loss_coef", "route_loss_target", "fastv_ratio", "pdrop_ratio", "route_bias",
                 "budget")


@strict
class DPNConfig(PreTrainedConfig):
    """Configuration of `DPNForConditionalGeneration`.

    Args (besides the LLaVA ones, which keep the meaning and defaults of `LlavaConfig`):
        compressor: "dpn" (routed pyramid), "static" (pyramid with a fixed path, no router),
            "none" (plain LLaVA-1.5), "fastv", "pdrop" (peer methods, same harness).
        dpe_layers: 0-based decoder layers hosting a Dynamic Pooling Expert; None = the end of each
            quarter of the depth (7/15/23 of 32 layers).
        experts: (kh, kw) max-pool kernels (= strides) the router picks from; the first must be (1, 1).
        pool: pooling function of the experts: "max" (paper), "avg" or "conv" (depthwise, init to mean).
        location: "post" pools a DPE layer's output (paper), "pre" its input.
        router_version: "mlp" = LayerNorm -> Linear(d, d/4) -> GELU -> Linear(d/4, E) (paper);
            "linear" = LayerNorm -> Linear(d, E) (ablation).
        gate_temperature: p = softmax(logits / T).
        route_loss_coef: weight of the routing loss added to the LM loss.
        route_loss_target: L_route = max(0, target - mean(s[j*] * p[j*])).
        min_tokens_to_pool: a sample with fewer visual tokens than this is not pooled at a DPE.
        min_tokens_after_pool: experts that would leave fewer tokens are never sampled in training.
        constrain_argmax: also apply `min_tokens_after_pool` to the argmax at inference (the reference
            does not; off by default to follow it).
        static_path: compression factor at each DPE for `compressor="static"` (1 keep, 2 = (1,2), 4 = (2,2)).
        router_objective: how the routers learn (`dpn.compressors.ROUTER_OBJECTIVES`): "reference" (the
            paper's p[chosen] scaling + routing loss) or "counterfactual" (the LLM trains on uniformly
            sampled paths, the routers are fitted afterwards to each calibration sample's loss under
            every path, `dpn.routing`). Pooled tokens are scaled by p[chosen] under "reference" only.
        route_bias: added to the router's log-probabilities as `route_bias * s_j` at inference (s_j = log2
            of expert j's compression factor): > 0 compresses more, < 0 less. Used when `budget` is None.
        budget: target mean LLM prefill FLOPs as a fraction of the uncompressed model; needs
            `budget_curve`, from which the bias is interpolated (`effective_route_bias`).
        budget_curve: {"bias": [...], "flops_fraction": [...]}: mean prefill FLOPs fraction measured on
            held-out data at each route_bias (`dpn.routing.measure_budget_curve`), increasing bias.
        random_path_shares: compressor "random": {path label ("4-2-1"): share}, the joint distribution each
            sample's path is drawn from (e.g. a dpn model's measured path shares); None: each DPE's expert
            uniformly. The draw is a function of the sample's tokens and pixels, so a batch routes each
            sample as it would alone.
        router_token_id: id of the `<ROUTER>` token; None = route every sample from its last prompt token.
        fastv_layer / fastv_ratio: FastV (K, R): layers 0..K-1 see every visual token; the attention of
            layer K-1 ranks them and layers K onwards keep floor(n * (1 - R)) (FastV's code). K >= 1.
        pdrop_layers / pdrop_ratio: PyramidDrop keeps floor(n * ratio) of the remaining visual tokens on
            entering each of its layers, ranked by that layer's attention; None = 8/16/24 of 32 layers.
    """

    model_type = "dpn"
    attribute_map = {"image_token_index": "image_token_id"}
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="clip_vision_model",
            # CLIP ViT-L/14-336, as in LLaVA-1.5.
            init_kwargs={
                "intermediate_size": 4096,
                "hidden_size": 1024,
                "patch_size": 14,
                "image_size": 336,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "projection_dim": 768,
            },
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32000
    router_token_id: int | None = None
    projector_hidden_act: str = "gelu"
    vision_feature_select_strategy: str = "default"
    vision_feature_layer: int = -2
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False

    compressor: str = "dpn"
    dpe_layers: list[int] | None = None
    experts: list[list[int]] | None = None
    pool: str = "max"
    location: str = "post"
    router_version: str = "mlp"
    gate_temperature: float = 10.0
    route_loss_coef: float = 1e-3
    route_loss_target: float = 1.5
    min_tokens_to_pool: int = 16
    min_tokens_after_pool: int = 18
    constrain_argmax: bool = False
    static_path: list[int] | None = None
    fastv_layer: int = 2
    fastv_ratio: float = 0.5
    pdrop_layers: list[int] | None = None
    pdrop_ratio: float = 0.5
    router_objective: str = "reference"
    route_bias: float = 0.0
    budget: float | None = None
    budget_curve: dict | None = None
    random_path_shares: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        # LLaVA-HR's dual-resolution tower (`dpn.configuration_hr`) is not an AutoConfig type: resolve it here.
        self.vision_config = hr_vision_config(self.vision_config)
        super().__post_init__(**kwargs)
        # NaN compares False with everything and inf passes "> 0": refuse both before the range checks below.
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        n_layers = self.text_config.num_hidden_layers
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"compressor must be one of {COMPRESSORS}, got {self.compressor!r}")
        if self.pool not in POOL_FUNCTIONS:
            raise ValueError(f"pool must be one of {POOL_FUNCTIONS}, got {self.pool!r}")
        if self.location not in LOCATIONS:
            raise ValueError(f"location must be one of {LOCATIONS}, got {self.location!r}")
        if self.router_version not in ROUTER_VERSIONS:
            raise ValueError(f"router_version must be one of {ROUTER_VERSIONS}, got {self.router_version!r}")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"vision_feature_select_strategy must be 'default' or 'full', got {self.vision_feature_select_strategy!r}"
            )
        if self.compressor in POOLING and self.vision_feature_select_strategy != "default":
            raise ValueError(
                "the pyramid pools the visual patch grid, which needs vision_feature_select_strategy='default' "
                f"(CLS dropped), got {self.vision_feature_select_strategy!r}"
            )
        self._check_pyramid(n_layers)
        self._check_peers_and_routing(n_layers)

    def _check_pyramid(self, n_layers: int) -> None:
        """DPE layers, experts, gate and the static path (defaults filled in)."""
        if self.dpe_layers is None:
            self.dpe_layers = default_dpe_layers(n_layers)
        self.dpe_layers = [int(i) for i in self.dpe_layers]
        if not self.dpe_layers or sorted(set(self.dpe_layers)) != self.dpe_layers:
            raise ValueError(f"dpe_layers must be non-empty, strictly increasing, got {self.dpe_layers}")
        if self.dpe_layers[0] < 0 or self.dpe_layers[-1] >= n_layers:
            raise ValueError(f"dpe_layers must lie in [0, {n_layers - 1}] for a {n_layers}-layer LLM, got {self.dpe_layers}")
        if self.experts is None:
            self.experts = [list(k) for k in DEFAULT_EXPERTS]
        self.experts = [[int(a) for a in k] for k in self.experts]
        if any(len(k) != 2 or min(k) < 1 for k in self.experts):
            raise ValueError(f"experts must be (kh, kw) pairs of positive ints, got {self.experts}")
        if self.experts[0] != [1, 1]:
            raise ValueError(f"the first expert must be the keep expert (1, 1), got {self.experts[0]}")
        factors = [expert_factor(k) for k in self.experts]
        if len(set(factors)) != len(factors):
            raise ValueError(f"experts must have distinct compression factors (kh*kw), got {self.experts}")
        if not self.gate_temperature > 0:
            raise ValueError(f"gate_temperature must be > 0, got {self.gate_temperature}")
        if self.route_loss_coef < 0:
            raise ValueError(f"route_loss_coef must be >= 0, got {self.route_loss_coef}")
        if self.min_tokens_to_pool < 1 or self.min_tokens_after_pool < 1:
            raise ValueError(
                f"min_tokens_to_pool and min_tokens_after_pool must be >= 1, got "
                f"{self.min_tokens_to_pool} and {self.min_tokens_after_pool}"
            )
        if self.static_path is None:
            # Default fixed path: strongest compression first, then weaker, e.g. (4, 2, 1) for three DPEs.
            ranked = sorted(factors, reverse=True)
            self.static_path = [ranked[i] if i < len(ranked) else 1 for i in range(len(self.dpe_layers))]
        self.static_path = [int(f) for f in self.static_path]
        if len(self.static_path) != len(self.dpe_layers):
            raise ValueError(
                f"static_path needs one factor per DPE layer ({len(self.dpe_layers)}), got {self.static_path}"
            )
        bad = [f for f in self.static_path if f not in factors]
        if bad:
            raise ValueError(f"static_path factors must be expert factors {factors}, got {bad}")

    def _check_peers_and_routing(self, n_layers: int) -> None:
        """FastV / PDrop settings, the router objective, the budget knob and the vision feature layer."""
        if not 1 <= self.fastv_layer < n_layers:
            # Layer K-1's attention ranks the tokens FastV keeps from layer K on: there is none before layer 0.
            raise ValueError(f"fastv_layer must lie in [1, {n_layers - 1}], got {self.fastv_layer}")
        if not 0.0 <= self.fastv_ratio < 1.0:
            raise ValueError(f"fastv_ratio (share of visual tokens dropped) must be in [0, 1), got {self.fastv_ratio}")
        if self.pdrop_layers is None:
            self.pdrop_layers = [int(round(n_layers / 4 * i)) for i in (1, 2, 3)]
        self.pdrop_layers = [int(i) for i in self.pdrop_layers]
        if sorted(set(self.pdrop_layers)) != self.pdrop_layers or not all(0 < i < n_layers for i in self.pdrop_layers):
            raise ValueError(f"pdrop_layers must be increasing in [1, {n_layers - 1}], got {self.pdrop_layers}")
        if not 0.0 < self.pdrop_ratio <= 1.0:
            raise ValueError(f"pdrop_ratio (share of visual tokens kept) must be in (0, 1], got {self.pdrop_ratio}")
        if self.router_objective not in ROUTER_OBJECTIVES:
            raise ValueError(f"router_objective must be one of {ROUTER_OBJECTIVES}, got {self.router_objective!r}")
        if not math.isfinite(self.route_bias):
            raise ValueError(f"route_bias must be a finite number, got {self.route_bias}")
        if self.random_path_shares is not None:
            self.random_path_shares = self._checked_shares(self.random_path_shares)
        if self.budget_curve is not None:
            self._check_budget_curve()
        if self.budget is not None:
            self.bias_for_budget(self.budget)  # refuses a budget the curve does not reach, naming the range
        if self.vision_feature_layer >= 0 and self.vision_feature_layer > self.vision_config.num_hidden_layers:
            raise ValueError(
                f"vision_feature_layer {self.vision_feature_layer} exceeds the vision tower's "
                f"{self.vision_config.num_hidden_layers} layers"
            )

    def _checked_shares(self, shares: dict) -> dict[str, float]:
        factors = self.expert_factors
        out = {}
        for label, share in shares.items():
            path = parse_path(label)
            if len(path) != len(self.dpe_layers) or any(f not in factors for f in path):
                raise ValueError(
                    f"random_path_shares: path {label!r} needs one factor of {factors} per DPE layer "
                    f"({len(self.dpe_layers)})"
                )
            if isinstance(share, bool) or not isinstance(share, int | float) or not share >= 0 or not math.isfinite(share):
                raise ValueError(f"random_path_shares[{label!r}] must be a finite number >= 0, got {share!r}")
            out[format_path(path)] = float(share)
        if not sum(out.values()) > 0:
            raise ValueError(f"random_path_shares must have a positive total, got {shares}")
        return out

    def _check_budget_curve(self) -> None:
        c = self.budget_curve
        if not isinstance(c, dict) or set(c) - {"bias", "flops_fraction", "samples"} or not {"bias", "flops_fraction"} <= set(c):
            raise ValueError(f"budget_curve must be {{'bias': [...], 'flops_fraction': [...]}}, got {c!r}")
        bias, frac = [float(b) for b in c["bias"]], [float(f) for f in c["flops_fraction"]]
        if len(bias) < 2 or len(bias) != len(frac) or bias != sorted(bias) or len(set(bias)) != len(bias):
            raise ValueError(f"budget_curve: bias must be >= 2 increasing values, one flops_fraction each, got {c!r}")
        if not all(math.isfinite(x) for x in bias + frac):
            raise ValueError(f"budget_curve: values must be finite, got {c!r}")
        c["bias"], c["flops_fraction"] = bias, frac

    def effective_route_bias(self) -> float:
        """The bias the routers apply at inference: the budget's, else `route_bias`."""
        return self.route_bias if self.budget is None else self.bias_for_budget(self.budget)

    def budget_range(self) -> tuple[float, float]:
        """(least, most) mean prefill FLOPs fraction the routers reach on the calibration data."""
        if self.budget_curve is None:
            raise ValueError("no budget_curve: calibrate the routers' budget first (dpn.routing.measure_budget_curve)")
        frac = self.budget_curve["flops_fraction"]
        return min(frac), max(frac)

    def bias_for_budget(self, budget: float) -> float:
        """route_bias whose measured mean FLOPs fraction is `budget` (linear interpolation of the curve,
        which falls as the bias rises). Raises ValueError naming the reachable range otherwise."""
        if isinstance(budget, bool) or not isinstance(budget, int | float) or not math.isfinite(budget):
            raise ValueError(f"budget must be a finite number (a fraction of the uncompressed FLOPs), got {budget!r}")
        lo, hi = self.budget_range()
        if not lo - 1e-9 <= budget <= hi + 1e-9:
            raise ValueError(
                f"budget {budget:g} is outside what the routing paths reach on the calibration data: "
                f"[{lo:.3f}, {hi:.3f}] of the uncompressed model's prefill FLOPs"
            )
        bias, frac = self.budget_curve["bias"], self.budget_curve["flops_fraction"]
        # The fraction is non-increasing in the bias up to measurement noise: walk the curve from the
        # gentlest end and interpolate in the first segment that brackets the target.
        pts = sorted(zip(frac, bias, strict=True), key=lambda p: (-p[0], p[1]))
        fr = [-p[0] for p in pts]
        i = min(max(bisect.bisect_left(fr, -budget), 1), len(pts) - 1)
        (f0, b0), (f1, b1) = pts[i - 1], pts[i]
        if f0 == f1:
            return b0
        return b0 + (budget - f0) * (b1 - b0) / (f1 - f0)

    # ----- derived geometry -------------------------------------------------------------------
    @property
    def expert_factors(self) -> list[int]:
        return [expert_factor(k) for k in self.experts]

    @property
    def vision_grid(self) -> tuple[int, int]:
        """(h, w) of the patch grid the vision tower produces (24 x 24 for CLIP ViT-L/14-336)."""
        side = self.vision_config.image_size // self.vision_config.patch_size
        return side, side

    @property
    def num_image_tokens(self) -> int:
        h, w = self.vision_grid
        return h * w + (1 if self.vision_feature_select_strategy == "full" else 0)

    def expert_index(self, factor: int) -> int:
        """Index of the expert with compression factor `factor` (1, 2 or 4 by default)."""
        factors = self.expert_factors
        if factor not in factors:
            raise ValueError(f"compression factor must be one of {factors}, got {factor}")
        return factors.index(factor)

    @property
    def expert_scores(self) -> list[float]:
        """s_j of the routing loss: log2 of the compression factor, [0, 1, 2] for keep / half / quarter."""
        return [math.log2(f) for f in self.expert_factors]


# Known to the Auto classes under its model_type, as transformers' own models are: AutoConfig (and
# AutoTokenizer, which reads config.json of a checkpoint directory) then read a DPN checkpoint without the
# "model of type dpn to instantiate a model of type ..." warning. A registry entry, no I/O.
AutoConfig.register(DPNConfig.model_type, DPNConfig, exist_ok=True)

__all__ = ["DPNConfig", "COMPRESSORS", "default_dpe_layers", "expert_factor"]
