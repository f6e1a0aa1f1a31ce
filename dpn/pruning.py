"""FastV and PyramidDrop: keep the visual tokens that a sample's last instruction token attends to most.

Both peers rank a sample's visual tokens by the softmax attention, averaged over heads, that its query
token pays them in one decoder layer, keep the top ones in their original order and drop the rest; they
differ in where (FastV: once, ranked by layer K-1 and pruned on entering layer K; PDrop: before each of
its layers, ranked by that layer) and how many (FastV: (1 - R) of all; PDrop: `ratio` of the remaining).

The query token ("last instruction token") is, per sample, the last prompt token: the position `generate`
pins (`route_index`), else in a labelled sequence every token right before a supervised span (each turn's
last prompt token, weighted equally, as PDrop's training code does), else the last real token. Never the
`<ROUTER>` token, which sits before the assistant prefix, and never an answer token (that would rank the
image by the answer it is being trained to produce).

Only the query rows of the attention map are computed, from the layer's input with its own norm, q/k
projections and RoPE (GQA-aware): what FastV reads from eager attention weights, without materialising
an L x L map, so layers keep running SDPA. The ranking is not differentiated through (PDrop detaches it
too); the kept tokens pass through unchanged, so training gradients flow through them as usual.

Everything here acts on a padded batch and returns per-sample indices; compaction, re-padding and
position renumbering are `modeling_dpn._SequenceState.replace_visual`'s.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import rotate_half

from dpn.constants import IGNORE_INDEX


def query_weights(
    attention_mask: torch.Tensor, labels: torch.Tensor | None = None, query_index: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, L) float32 weights of the query ("last instruction") tokens of each sample, summing to 1.

    `query_index` (B,) pins one position per sample (generation passes its last prompt position, so the
    uncached reference, which appends tokens, ranks exactly as the cached prefill did). Otherwise, with
    `labels`, every real position t whose next label is supervised and whose own is not (the last prompt
    token of each turn); otherwise, or in a sample without supervised labels, its last real token.
    """
    mask = attention_mask.bool()
    B, L = mask.shape
    if query_index is not None:
        w = torch.zeros(B, L, dtype=torch.float32, device=mask.device)
        return w.scatter_(1, query_index.long().view(B, 1).to(mask.device), 1.0)
    # Last real token: L - 1 minus the offset of the first True in the reversed mask.
    last_real = (L - 1) - mask.flip(-1).int().argmax(-1)  # (B,)
    w = torch.zeros(B, L, dtype=torch.float32, device=mask.device)
    w.scatter_(1, last_real[:, None], 1.0)
    if labels is not None:
        sup = (labels != IGNORE_INDEX) & mask
        before = torch.zeros_like(sup)
        before[:, :-1] = sup[:, 1:] & ~sup[:, :-1] & mask[:, :-1]
        n = before.sum(-1, keepdim=True)  # (B, 1)
        w = torch.where(n > 0, before.float() / n.clamp(min=1), w)
    return w


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, heads, n, hd); cos, sin: (B, n, hd). LLaMA's rotary embedding (HF's `apply_rotary_pos_emb`).
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


@torch.no_grad()
def query_attention(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_weight: torch.Tensor,
) -> torch.Tensor:
    """(B, L) float32: the softmax attention that each sample's query tokens pay every key in the
    self-attention of `layer` (an HF `LlamaDecoderLayer`) run on `hidden`, averaged over heads, then
    over the query tokens with `query_weight`.

    Args:
        hidden: (B, L, d) the layer's INPUT (before its input norm), in the padded layout of `mask`.
        mask: (B, L) bool, True = real token; padding keys get no attention, and a query sees only keys
            at or before itself (causal), exactly as the layer's own attention mask allows.
        position_embeddings: (cos, sin), each (B, L, hd), the rotary embedding the layer runs with.
        query_weight: (B, L) float, see `query_weights`; zero outside the query tokens.

    Equal to HF's eager attention weights `attn_weights[b, :, t, :].mean(0)` for a single query t
    (tested); scores are taken in fp32 whatever the model dtype.
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)  # (B, L, d)
    B, L, d = x.shape
    hd = attn.head_dim
    n_q = max(int((query_weight > 0).sum(-1).max()), 1)
    w, q_idx = query_weight.topk(n_q, dim=-1)  # (B, Q): samples with fewer queries carry weight-0 slots
    cos, sin = position_embeddings
    k = attn.k_proj(x).view(B, L, -1, hd).transpose(1, 2)  # (B, KV, L, hd)
    k = _rope(k, cos, sin)
    xq = x.gather(1, q_idx[..., None].expand(B, n_q, d))  # (B, Q, d)
    q = attn.q_proj(xq).view(B, n_q, -1, hd).transpose(1, 2)  # (B, H, Q, hd)
    q = _rope(q, cos.gather(1, q_idx[..., None].expand(B, n_q, hd)), sin.gather(1, q_idx[..., None].expand(B, n_q, hd)))
    H, KV = q.shape[1], k.shape[1]
    # GQA: query head h reads key head h // (H / KV), as HF's repeat_kv lays them out.
    q = q.float().reshape(B, KV, H // KV, n_q, hd)
    scores = torch.einsum("bgrqd,bgkd->bgrqk", q, k.float()).reshape(B, H, n_q, L) * attn.scaling
    keys = torch.arange(L, device=x.device)
    allowed = mask[:, None, :] & (keys[None, None, :] <= q_idx[:, :, None])  # (B, Q, L)
    # dtype-min rather than -inf: a weight-0 slot sitting on padding sees no key and must stay finite.
    scores = scores.masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    probs = scores.softmax(dim=-1).mean(dim=1)  # (B, Q, L) head-averaged
    return torch.einsum("bq,bql->bl", w.float(), probs)


def top_visual(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest of one sample's visual-span `scores` (n,), in their original order."""
    if not 0 <= keep <= scores.shape[0]:
        raise ValueError(f"cannot keep {keep} of {scores.shape[0]} visual tokens")
    return scores.topk(keep).indices.sort().values


def ranking_flops(n_tokens: int, n_query: int, text_config) -> float:
    """Exact matmul FLOPs (2 per MAC) `query_attention` adds in its layer for one sample of `n_tokens`
    tokens and `n_query` query tokens: k_proj on every token, q_proj on the queries, QK^T of the query
    rows. Not part of `dpn.flops`' accounting, where, as in the FastV / PDrop papers, the ranking is free:
    at 7B geometry with 640 tokens one ranking (mostly the extra k projection) is about 0.25 % of the
    prefill's exact FLOPs."""
    d = text_config.hidden_size
    h = text_config.num_attention_heads
    kv = getattr(text_config, "num_key_value_heads", None) or h
    hd = getattr(text_config, "head_dim", None) or d // h
    return float(2 * n_tokens * d * kv * hd + 2 * n_query * d * h * hd + 2 * n_query * n_tokens * h * hd)


__all__ = ["query_weights", "query_attention", "top_visual", "ranking_flops"]
