"""Generation for every compressor: one compressed prefill, then cached decode steps.

Each decoder layer keeps its own KV cache length (shallow layers the full visual K/V, deep layers the
pooled or pruned K/V) and each decode step continues each stage's own RoPE positions; nothing is pooled
or pruned during decode. Batches run left-padded (right-padded prompts are left-aligned first); every
sample gets exactly the tokens it would get alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpn.collate import padding_side_of


@dataclass
class GenerationOutput:
    """What `generate(..., return_dict_in_generate=True)` returns (transformers' convention: `sequences`
    holds the prompt and the new tokens), plus the prefill's routing and token counts."""

    sequences: torch.Tensor  # (B, L + T): the left-padded prompts, then the new tokens (`pad_token_id` after EOS)
    num_new_tokens: torch.Tensor  # (B,) new tokens up to and including EOS
    routing_paths: torch.Tensor  # (B, n_dpe) expert index per DPE of the prefill, -1 = not pooled
    visual_tokens_per_layer: torch.Tensor  # (B, n_layers) at prefill
    text_tokens_per_layer: torch.Tensor  # (B, n_layers) at prefill
    prompt_length: int = 0  # L: `sequences[:, L:]` are the new tokens

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]  # (B, T)


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad: int, *rows_of: torch.Tensor):
    """Right-padded (or unpadded) rows -> left-padded ones: each row's real tokens moved to its end.
    Positions are counted over real tokens only, so this changes no logit."""
    if padding_side_of(attention_mask) != "right":
        return (input_ids, attention_mask, *rows_of)
    n = attention_mask.long().sum(-1)  # (B,)
    L = input_ids.shape[1]
    shift = (L - n)[:, None]  # (B, 1)
    idx = (torch.arange(L, device=input_ids.device)[None] - shift) % L  # source index of each target slot
    take = lambda t: t.gather(1, idx)  # noqa: E731
    new_mask = (torch.arange(L, device=input_ids.device)[None] >= shift).to(attention_mask.dtype)
    new_ids = take(input_ids).masked_fill(new_mask == 0, pad)
    return (new_ids, new_mask, *[take(t) for t in rows_of])


def _next_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """logits: (B, V) -> (B,) next token ids (greedy, or sampling with temperature / top-k / top-p)."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop tokens once the mass before them already reaches top_p (the first token always stays).
        drop = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    force_path: torch.Tensor | None = None,
    return_dict_in_generate: bool = False,
) -> torch.Tensor | GenerationOutput:
    """Generate up to `max_new_tokens` per prompt.

    Prompts may be padded on either side (right-padded ones are left-aligned first). Returns, as
    transformers does, a (B, L + T) tensor of the (left-padded) prompts followed by the new tokens, or with
    `return_dict_in_generate=True` a `GenerationOutput` that also carries the prefill's routing paths and
    token counts. `force_path` (B, n_dpe) fixes each sample's expert per DPE, as in `forward`. With
    `use_cache=False` every step re-runs the whole (compressed) prefix — the reference the cached path is
    tested against.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    cfg = model.config
    eos = cfg.text_config.eos_token_id if eos_token_id is None else eos_token_id
    pad = cfg.text_config.pad_token_id if pad_token_id is None else pad_token_id
    pad = 0 if pad is None else pad
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    input_ids, attention_mask = left_align(input_ids, attention_mask, pad)
    B, L = input_ids.shape
    device = input_ids.device
    # The router of a prompt without <ROUTER> reads its last prompt token, and FastV / PDrop rank visual
    # tokens by its attention; pin that position so the uncached reference (which appends tokens) routes
    # and prunes exactly as the cached prefill did.
    route_index = torch.full((B,), L - 1, dtype=torch.long, device=device)
    common = dict(pixel_values=pixel_values, logits_to_keep=1, route_index=route_index, force_path=force_path)

    out = model(input_ids, attention_mask=attention_mask, use_cache=use_cache, **common)
    prefill = out
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    tokens = []
    seq, mask = input_ids, attention_mask
    for step in range(max_new_tokens):
        nxt = _next_token(out.logits[:, -1], do_sample, temperature, top_k, top_p, generator)  # (B,)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        tokens.append(nxt)
        lengths += (~finished).long()
        if eos is not None:
            finished |= nxt == eos
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        if use_cache:
            out = model(nxt[:, None], cache=out.cache, logits_to_keep=1)
        else:
            # Finished samples keep being fed (their outputs are discarded) so every row stays real.
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt[:, None])], dim=1)
            out = model(seq, attention_mask=mask, **common)
    sequences = torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)  # (B, L + T)
    if not return_dict_in_generate:
        return sequences
    return GenerationOutput(
        sequences=sequences,
        num_new_tokens=lengths,
        routing_paths=prefill.routing_paths,
        visual_tokens_per_layer=prefill.visual_tokens_per_layer,
        text_tokens_per_layer=prefill.text_tokens_per_layer,
        prompt_length=L,
    )
