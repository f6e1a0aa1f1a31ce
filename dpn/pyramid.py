"""The pyramid: where a sample's visual tokens are pooled, and the Dynamic Pooling Experts' router.

Everything here acts on ONE sample's visual grid or on a batch of router inputs; the batching,
re-padding and position renumbering around it live in `modeling_dpn.py` (`_SequenceState`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpn.geometry import pooled_grid


class DPNRouter(nn.Module):
    """Dynamic Pooling Experts router: reads the host layer's hidden state at the `<ROUTER>` token(s) and
    scores the experts. "mlp" is the paper's LayerNorm -> Linear(d, d/4) -> GELU -> Linear(d/4, E);
    "linear" the reference code's ablation, Linear(d, E) alone (no LayerNorm). Both linears start as the
    reference initialises them: kaiming-uniform with a = sqrt(5) (`DPNPreTrainedModel._init_weights`)."""

    def __init__(self, hidden_size: int, num_experts: int, version: str = "mlp"):
        super().__init__()
        self.version = version
        # (x - input_shift) * input_scale before the LayerNorm: identity unless set from calibration data
        # (`dpn.routing.fit_routers`). Why: the hidden state at <ROUTER> is mostly a part every sample
        # shares; what tells samples apart is a small deviation from it, which a per-sample LayerNorm
        # alone does not bring out.
        self.register_buffer("input_shift", torch.zeros(hidden_size))
        self.register_buffer("input_scale", torch.ones(hidden_size))
        self.norm = nn.LayerNorm(hidden_size) if version == "mlp" else nn.Identity()
        if version == "mlp":
            self.fc1 = nn.Linear(hidden_size, hidden_size // 4, bias=False)
            self.act = nn.GELU()
            self.fc2 = nn.Linear(hidden_size // 4, num_experts, bias=False)
        elif version == "linear":
            self.fc = nn.Linear(hidden_size, num_experts, bias=False)
        else:
            raise ValueError(f"router version must be 'mlp' or 'linear', got {version!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (n, d) -> logits (n, E), returned in fp32 so the gate softmax(logits / T) is taken in fp32.
        x = self.norm((x - self.input_shift.to(x.dtype)) * self.input_scale.to(x.dtype))
        logits = self.fc2(self.act(self.fc1(x))) if self.version == "mlp" else self.fc(x)
        return logits.float()


class PoolingExperts(nn.Module):
    """The experts of one DPE layer: 2-D pooling of a (h, w) grid of visual tokens with kernel = stride.

    "max" is the paper's choice; "avg" and "conv" (a depthwise conv initialised to averaging, so it starts
    as "avg" and can learn) are the reference code's ablations.
    """

    def __init__(self, hidden_size: int, experts: list[list[int]], pool: str):
        super().__init__()
        self.kernels = [tuple(k) for k in experts]
        self.pool = pool
        if pool == "conv":
            self.convs = nn.ModuleDict()
            for j, k in enumerate(self.kernels):
                if k == (1, 1):
                    continue
                conv = nn.Conv2d(hidden_size, hidden_size, kernel_size=k, stride=k, groups=hidden_size, bias=False)
                conv.dpn_avg_init = 1.0 / (k[0] * k[1])  # read by DPNPreTrainedModel._init_weights
                nn.init.constant_(conv.weight, conv.dpn_avg_init)
                self.convs[str(j)] = conv

    def forward(self, tokens: torch.Tensor, h: int, w: int, expert: int) -> tuple[torch.Tensor, int, int]:
        """tokens: (h*w, d) in row-major grid order -> (h'*w', d), h', w'."""
        kernel = self.kernels[expert]
        if kernel == (1, 1):
            return tokens, h, w
        d = tokens.shape[-1]
        grid = tokens.transpose(0, 1).reshape(1, d, h, w)  # (1, d, h, w)
        if self.pool == "max":
            pooled = F.max_pool2d(grid, kernel_size=kernel, stride=kernel)
        elif self.pool == "avg":
            pooled = F.avg_pool2d(grid, kernel_size=kernel, stride=kernel)
        else:
            pooled = self.convs[str(expert)](grid)
        nh, nw = pooled_grid(h, w, kernel)
        assert pooled.shape[-2:] == (nh, nw), (pooled.shape, nh, nw)
        return pooled.reshape(d, nh * nw).transpose(0, 1), nh, nw  # (h'*w', d)


def valid_experts(grids: list[tuple[int, int]], experts: list[list[int]], min_tokens_after: int) -> torch.Tensor:
    """(n, E) bool: which experts leave at least `min_tokens_after` tokens for each grid. Keep is always valid."""
    rows = []
    for h, w in grids:
        row = []
        for j, k in enumerate(experts):
            nh, nw = pooled_grid(h, w, tuple(k))
            row.append(j == 0 or nh * nw >= min_tokens_after)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


def choose_experts(
    probs: torch.Tensor,
    valid: torch.Tensor,
    sample: bool,
    constrain_argmax: bool,
    generator: torch.Generator | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one expert per sample from the gate probabilities p: (n, E).

    Training samples j ~ p restricted to the valid experts. The reference resamples until the choice is
    valid; sampling from p renormalised over the valid set is the same distribution, without a loop.
    Inference takes argmax (log p + bias) (over the valid set only if `constrain_argmax`); `bias` (E,) is
    the compute-budget knob (`DPNConfig.route_bias` times each expert's compression score).
    """
    valid = valid.to(probs.device)
    if sample:
        masked = probs.detach().masked_fill(~valid, 0.0)
        return torch.multinomial(masked, 1, generator=generator).squeeze(-1)
    scores = probs.detach().clamp(min=1e-30).log()
    if bias is not None:
        scores = scores + bias.to(scores.device, scores.dtype)
    if constrain_argmax:
        scores = scores.masked_fill(~valid, float("-inf"))
    return scores.argmax(-1)


def sample_seeds(input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values, image_token_id: int) -> list[int]:
    """A 63-bit seed per sample from its real tokens and, for image samples, its pixels (images are given
    in the order of the samples holding image tokens): the same sample gets the same seed alone or in any
    batch, under any padding."""
    import hashlib

    seeds, k = [], 0
    for b in range(input_ids.shape[0]):
        ids = input_ids[b][attention_mask[b].bool()]
        h = hashlib.blake2b(ids.cpu().numpy().tobytes(), digest_size=8)
        if pixel_values is not None and bool((ids == image_token_id).any()):
            h.update(pixel_values[k].detach().float().cpu().numpy().tobytes())
            k += 1
        seeds.append(int.from_bytes(h.digest(), "little") >> 1)
    return seeds


def routing_loss(probs: torch.Tensor, scores: torch.Tensor, target: float) -> torch.Tensor:
    """L_route = max(0, target - mean_i s[j*_i] * p_i[j*_i]), j* = argmax p, over all routed (sample, DPE).

    probs: (n, E) gate probabilities of every routed sample at every DPE; scores: (E,) = [0, 1, 2] for
    keep / half / quarter. Pushes routers towards confident compression; the LM loss pulls back.
    """
    if probs.numel() == 0:
        return probs.sum() * 0.0
    top_p, top_j = probs.max(dim=-1)  # (n,)
    compression = scores.to(probs.device, probs.dtype)[top_j] * top_p
    return torch.clamp(target - compression.mean(), min=0.0)
