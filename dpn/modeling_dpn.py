"""DPN for conditional generation: LLaVA-1.5 (CLIP vision tower -> MLP projector -> LLaMA decoder) whose
decoder pools each sample's visual tokens at the DPE layers, as routed per sample by Dynamic Pooling Experts.

Layout of one forward (prefill):
  pixel_values -> vision_tower (layer -2, CLS dropped) -> multi_modal_projector -> image features
  input_ids -> embeddings, image tokens replaced by image features      # (B, L, d)
  for each decoder layer i:
      [DPE before layer i if location == "pre"]
      [PDrop before each layer of pdrop_layers: keep the visual tokens layer i's attention ranks highest]
      hidden = layer_i(hidden)                                          # runs on this stage's length
      [DPE after layer i if location == "post"]: per sample, pool the visual grid with the routed expert,
          scale by p[chosen], drop padding, re-pad to the longest sample, renumber positions.
      [FastV after layer K-1: keep the visual tokens layer K-1's attention ranked highest]

Every compressor changes a sample's visual span through one seam, `_SequenceState.replace_visual`; each
change starts a new stage (its own padding mask, positions and, in the cache, KV length).

The decoder layers are the HF `LlamaDecoderLayer`s of `language_model` called one by one, so that each
stage really runs on its own (shorter) sequence and each layer's KV cache keeps its own length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    DynamicCache,
    PreTrainedModel,
)
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from dpn.collate import padding_side_of
from dpn.compressors import POOLING, PRUNING, parse_path
from dpn.configuration_dpn import DPNConfig
from dpn.configuration_hr import is_hr_vision
from dpn.constants import IGNORE_INDEX
from dpn.generation import generate as _generate
from dpn.geometry import kept_count
from dpn.pruning import query_attention, query_weights, top_visual
from dpn.pyramid import DPNRouter, PoolingExperts, choose_experts, routing_loss, sample_seeds, valid_experts
from dpn.vision_hr import LlavaHRVisionModel


class DPNMultiModalProjector(nn.Module):
    """LLaVA-1.5's 2-layer MLP projector (HF names `linear_1`, `linear_2`, so llava-hf weights load)."""

    def __init__(self, config: DPNConfig):
        super().__init__()
        vision_dim = config.vision_config.hidden_size
        text_dim = config.text_config.hidden_size
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=config.multimodal_projector_bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(text_dim, text_dim, bias=config.multimodal_projector_bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


class DPNCache(DynamicCache):
    """HF DynamicCache (one K/V tensor pair per layer, each with its own length) plus, per pyramid stage,
    the padding mask of that stage's cached sequence. Decode steps append to every stage."""

    def __init__(self, config):
        super().__init__(config=config)
        self.stage_masks: list[torch.Tensor] = []  # (B, L_stage) bool, one per stage
        self.layer_stage: list[int] = []  # stage index of each decoder layer

    def next_positions(self, stage: int) -> torch.Tensor:
        """(B,) RoPE position of the next token in this stage: the count of its cached real tokens."""
        return self.stage_masks[stage].sum(-1)


@dataclass
class DPNOutput(ModelOutput):
    """Outputs of `DPNForConditionalGeneration.forward`.

    logits are in the layout of the LAST stage (visual tokens pooled, padding re-done); `attention_mask`
    is that layout's mask. `routing_paths` holds the expert index chosen per sample at each DPE (-1 = not
    pooled: text-only sample, too few tokens, decode step); `routing_probs` the gate p (0 where not routed).
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    route_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: DPNCache | None = None
    attention_mask: torch.Tensor | None = None
    routing_paths: torch.Tensor | None = None  # (B, n_dpe) long
    routing_probs: torch.Tensor | None = None  # (B, n_dpe, E) float
    visual_tokens_per_layer: torch.Tensor | None = None  # (B, n_layers) long: input tokens of each layer
    text_tokens_per_layer: torch.Tensor | None = None  # (B, n_layers) long
    num_label_tokens: torch.Tensor | None = None  # () long: supervised tokens behind lm_loss
    sample_loss: torch.Tensor | None = None  # (B,) mean CE over each sample's supervised tokens (0: none)
    router_inputs: torch.Tensor | None = None  # (B, n_dpe, d) what each router read (0 where not routed)


@dataclass
class _Routing:
    """Per-forward routing record, filled DPE by DPE by `_apply_dpe`."""

    paths: torch.Tensor  # (B, n_dpe) long, -1 = not pooled
    probs: torch.Tensor  # (B, n_dpe, E) gate p, 0 where not routed
    routed_probs: list  # the (n, E) gate p of every DPE, with their graph (routing loss)
    force_path: torch.Tensor | None  # (B, n_dpe) expert indices imposed on every sample
    inputs: torch.Tensor | None = None  # (B, n_dpe, d) when the forward was asked for router inputs


class _SequenceState:
    """The batch as the current stage of the decoder sees it.

    Per sample we track where its visual span starts among its real tokens and its current (h, w) grid
    ((1, n) once FastV / PDrop have picked n tokens: a selection has no grid); per token, attributes that
    must follow the tokens through compaction: the shifted LM target, the router-read weight and the
    FastV / PDrop query weight.
    """

    def __init__(self, hidden, mask, vis_start, grid, targets, route_weight, left_pad, query_weight=None):
        self.hidden = hidden  # (B, L, d)
        self.mask = mask  # (B, L) bool, True = real token
        self.vis_start = vis_start  # list[int]: offset of the visual span among real tokens, -1 = none
        self.grid = grid  # list[(h, w)]: (0, 0) for text-only samples
        self.targets = targets  # (B, L) long or None: label of the NEXT token (already shifted)
        self.route_weight = route_weight  # (B, L) float: router input = sum_t weight_t * hidden_t
        self.left_pad = left_pad
        # (B, L) float: FastV / PDrop rank visual tokens by the attention of these tokens (`dpn.pruning`).
        self.query_weight = torch.zeros_like(route_weight) if query_weight is None else query_weight

    @property
    def positions(self) -> torch.Tensor:
        # Contiguous RoPE positions over real tokens: renumbered after every compaction.
        return (self.mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)

    def visual_counts(self) -> list[int]:
        return [h * w for h, w in self.grid]

    def text_counts(self) -> list[int]:
        real = self.mask.sum(-1).tolist()
        return [n - v for n, v in zip(real, self.visual_counts(), strict=True)]

    def visual_offsets(self) -> list[int]:
        """Index of each sample's visual span in the padded layout (-1 = no image)."""
        real = self.mask.sum(-1).tolist()
        L = self.mask.shape[1]
        return [
            -1 if s < 0 else (L - n + s if self.left_pad else s) for s, n in zip(self.vis_start, real, strict=True)
        ]

    def router_inputs(self) -> torch.Tensor:
        # (B, d): weighted mean of the hidden states at the <ROUTER> tokens (or the last prompt token).
        w = self.route_weight.to(self.hidden.dtype)
        return torch.einsum("bl,bld->bd", w, self.hidden)

    def replace_visual(self, new_visual: list[tuple[torch.Tensor, int, int] | None]) -> None:
        """Swap each sample's visual span for new tokens (n', d) with grid (h', w'); None = unchanged.
        Text tokens keep their order; padding is re-done to the longest sample."""
        seqs, tgts, rws, qws = [], [], [], []
        for b in range(self.hidden.shape[0]):
            real = self.mask[b]
            h_b = self.hidden[b][real]  # (n_b, d)
            t_b = self.targets[b][real] if self.targets is not None else None
            r_b = self.route_weight[b][real]
            q_b = self.query_weight[b][real]
            if new_visual[b] is not None:
                tokens, nh, nw = new_visual[b]
                n_new = tokens.shape[0]
                s = self.vis_start[b]
                e = s + self.grid[b][0] * self.grid[b][1]
                h_b = torch.cat([h_b[:s], tokens, h_b[e:]], dim=0)
                if t_b is not None:
                    # The last visual token predicts the first token after the image; keep that target on
                    # the last pooled token so the shifted labels stay aligned.
                    vis_t = torch.full((n_new,), IGNORE_INDEX, dtype=t_b.dtype, device=t_b.device)
                    if n_new:
                        vis_t[-1] = t_b[e - 1]
                    t_b = torch.cat([t_b[:s], vis_t, t_b[e:]])
                r_b = torch.cat([r_b[:s], r_b.new_zeros(n_new), r_b[e:]])
                # A query token inside the span (a prompt ending on its image) hands its weight to the last
                # new token, which now sits right before the answer, as it did.
                vis_q = q_b.new_zeros(n_new)
                if n_new:
                    vis_q[-1] = q_b[s:e].sum()
                q_b = torch.cat([q_b[:s], vis_q, q_b[e:]])
                self.grid[b] = (nh, nw)
            seqs.append(h_b)
            tgts.append(t_b)
            rws.append(r_b)
            qws.append(q_b)
        lengths = [s.shape[0] for s in seqs]
        L = max(lengths)
        B, d = len(seqs), self.hidden.shape[-1]
        hidden = self.hidden.new_zeros(B, L, d)
        mask = torch.zeros(B, L, dtype=torch.bool, device=self.hidden.device)
        targets = None if self.targets is None else self.targets.new_full((B, L), IGNORE_INDEX)
        route_weight = self.route_weight.new_zeros(B, L)
        query_weight = self.query_weight.new_zeros(B, L)
        for b, n in enumerate(lengths):
            sl = slice(L - n, L) if self.left_pad else slice(0, n)
            hidden[b, sl] = seqs[b]
            mask[b, sl] = True
            route_weight[b, sl] = rws[b]
            query_weight[b, sl] = qws[b]
            if targets is not None:
                targets[b, sl] = tgts[b]
        self.hidden, self.mask, self.targets = hidden, mask, targets
        self.route_weight, self.query_weight = route_weight, query_weight


def build_attention_mask(kv_mask: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal + padding mask (B, 1, q, K) for the last q of K cached positions.

    Works for both the eager and the SDPA attention of HF LLaMA. Masked entries get dtype-min (not -inf) so
    a padding query row that sees no real key stays finite.
    """
    K = kv_mask.shape[-1]
    k_idx = torch.arange(K, device=kv_mask.device)
    q_idx = torch.arange(q_len, device=kv_mask.device) + (K - q_len)
    allowed = (k_idx[None, :] <= q_idx[:, None])[None] & kv_mask[:, None, :]  # (B, q, K)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=kv_mask.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def last_real_positions(hidden: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, d), (B, L) -> the last `k` positions of each row that are real tokens or, in a row with fewer
    than k, its padding before them: (B, k, d) and their mask (B, k). Under left or no padding that is
    `hidden[:, -k:]`, as transformers' `logits_to_keep`; under right padding it skips each row's padding,
    so a batch keeps the positions each sample alone would keep."""
    L = hidden.shape[1]
    k = min(k, L)
    if bool(mask[:, -1].all()):
        return hidden[:, -k:], mask[:, -k:]
    ends = mask.long().sum(-1)  # (B,) right padding: real tokens are [0, n_b)
    pos = ends[:, None] - k + torch.arange(k, device=mask.device)[None]  # (B, k), < 0 before a short row
    idx = pos.clamp(min=0)
    rows = torch.arange(hidden.shape[0], device=mask.device)[:, None]
    return hidden[rows, idx], mask[rows, idx] & (pos >= 0)


class DPNPreTrainedModel(PreTrainedModel):
    config_class = DPNConfig
    config: DPNConfig
    # No attribute has this name: HF must never add or strip a prefix when loading our checkpoints.
    base_model_prefix = "dpn"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True
    # The routers' input standardisation is identity until fitted (`dpn.routing`); checkpoints written before
    # it existed load with the identity.
    _keys_to_ignore_on_load_missing = [r"routers\.\d+\.input_(shift|scale)"]
    # A checkpoint trained with routers, loaded with another compressor (static, none, ...), has routers the
    # model does not build: not an error, so no UNEXPECTED load report. (A dpn model that lacks router weights
    # is refused by `dpn.inference.load_model`, not silenced here.)
    _keys_to_ignore_on_load_unexpected = [r"^routers\."]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d) and hasattr(module, "dpn_avg_init"):
            # Conv pooling experts start as average pooling over their kernel.
            nn.init.constant_(module.weight, module.dpn_avg_init)
            return
        if isinstance(module, DPNRouter):
            if isinstance(module.norm, nn.LayerNorm):
                nn.init.ones_(module.norm.weight)
                nn.init.zeros_(module.norm.bias)
            module.input_shift.zero_()
            module.input_scale.fill_(1.0)
            for lin in (module.fc1, module.fc2) if module.version == "mlp" else (module.fc,):
                # As the reference code (and torch's Linear default): kaiming-uniform, a = sqrt(5).
                nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5))
            return
        super()._init_weights(module)


class DPNForConditionalGeneration(DPNPreTrainedModel):
    """LLaVA-1.5 with a Dynamic Pyramid Network inside its LLM (see the module docstring)."""

    def __init__(self, config: DPNConfig):
        super().__init__(config)
        if config.budget is not None:
            # from_pretrained(..., budget=x) sets the field after the config's own checks: check it here.
            config.bias_for_budget(config.budget)
        if is_hr_vision(config.vision_config):  # LLaVA-HR: CLIP + ConvNeXt + MR-adapters (`dpn.vision_hr`)
            self.vision_tower = LlavaHRVisionModel(config.vision_config)
        else:
            self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = DPNMultiModalProjector(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        d = config.text_config.hidden_size
        n_exp = len(config.experts)
        if config.compressor in POOLING:
            self.pool_experts = nn.ModuleDict(
                {str(i): PoolingExperts(d, config.experts, config.pool) for i in config.dpe_layers}
            )
        if config.compressor == "dpn":
            self.routers = nn.ModuleDict({str(i): DPNRouter(d, n_exp, config.router_version) for i in config.dpe_layers})
        self.post_init()

    # ----- HF plumbing ------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    @property
    def decoder(self):
        return self.language_model.model

    # ----- vision -----------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, h*w, d_text): CLIP features of layer `vision_feature_layer`, CLS dropped
        ("default" strategy), projected into the LLM's embedding space."""
        dtype = next(self.vision_tower.parameters()).dtype
        if is_hr_vision(self.config.vision_config):
            # LLaVA-HR's tower returns the fused 32 x 32 grid itself: every CLIP layer, no CLS.
            return self.multi_modal_projector(self.vision_tower(pixel_values.to(dtype)))
        out = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True)
        feats = out.hidden_states[self.config.vision_feature_layer]  # (N, 1 + h*w, d_vis)
        if self.config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        return self.multi_modal_projector(feats)

    # ----- inputs -----------------------------------------------------------------------------
    def _embed_inputs(self, input_ids, pixel_values, attention_mask):
        """Embeds the prompt and drops the image features in place of the image tokens.

        Returns (embeds (B, L, d), vis_start list[int], grid list[(h, w)]) where vis_start counts real
        tokens before the sample's image span.
        """
        cfg = self.config
        B, L = input_ids.shape
        embeds = self.get_input_embeddings()(input_ids.masked_fill(input_ids == cfg.image_token_id, 0))  # (B, L, d)
        is_img = input_ids == cfg.image_token_id
        n_img_tokens = is_img.sum(-1).tolist()
        n_per_image = cfg.num_image_tokens
        vis_start, grid = [], []
        has_image = []
        for b in range(B):
            n = n_img_tokens[b]
            if n == 0:
                vis_start.append(-1)
                grid.append((0, 0))
                continue
            if n != n_per_image:
                raise ValueError(
                    f"sample {b} holds {n} image tokens (id {cfg.image_token_id}); the model takes one image per "
                    f"sample expanded to exactly {n_per_image} tokens"
                )
            idx = is_img[b].nonzero().squeeze(-1)
            if int(idx[-1] - idx[0]) + 1 != n:
                raise ValueError(f"sample {b}: its {n} image tokens are not contiguous")
            if not bool(attention_mask[b, idx].all()):
                raise ValueError(f"sample {b}: image tokens fall under attention_mask == 0")
            vis_start.append(int(attention_mask[b, : idx[0]].sum()))
            h, w = cfg.vision_grid
            grid.append((h, w) if cfg.vision_feature_select_strategy == "default" else (1, n))
            has_image.append(b)
        n_pix = 0 if pixel_values is None else pixel_values.shape[0]
        if n_pix != len(has_image):
            raise ValueError(
                f"got {n_pix} images in pixel_values for {len(has_image)} samples with image tokens; pass one "
                "image per sample that has image tokens, in sample order"
            )
        if has_image:
            feats = self.get_image_features(pixel_values).to(embeds.dtype)  # (N, h*w, d)
            embeds = embeds.masked_scatter(is_img.unsqueeze(-1).expand_as(embeds), feats.reshape(-1, feats.shape[-1]))
        return embeds, vis_start, grid

    @staticmethod
    def _route_weights(input_ids, attention_mask, labels, router_token_id, route_index=None) -> torch.Tensor:
        """(B, L) float weights of the positions the router reads: the mean over `<ROUTER>` tokens, or
        (no such token) the last prompt token: `route_index` if given, else the token before the first
        supervised label, else the last real token."""
        B, L = input_ids.shape
        w = torch.zeros(B, L, dtype=torch.float32, device=input_ids.device)
        is_router = (input_ids == router_token_id) if router_token_id is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        is_router &= attention_mask.bool()
        for b in range(B):
            k = int(is_router[b].sum())
            if k:
                w[b, is_router[b]] = 1.0 / k
                continue
            pos = None if route_index is None else int(route_index[b])
            if pos is None and labels is not None:
                sup = (labels[b] != IGNORE_INDEX).nonzero()
                if len(sup) and int(sup[0]) > 0:
                    pos = int(sup[0]) - 1
            if pos is None:
                real = attention_mask[b].nonzero()
                pos = int(real[-1]) if len(real) else L - 1
            w[b, pos] = 1.0
        return w

    # ----- the pyramid ------------------------------------------------------------------------
    def _apply_dpe(self, state: _SequenceState, layer: int, dpe_idx: int, routing: _Routing) -> None:
        """Pool each sample's visual grid at DPE `layer` with its expert: routed (dpn), fixed (static),
        drawn per sample (random) or imposed (`force_path`)."""
        cfg = self.config
        B = state.hidden.shape[0]
        poolable = [v >= cfg.min_tokens_to_pool for v in state.visual_counts()]
        if not any(poolable):
            return
        rows = [b for b in range(B) if poolable[b]]
        grids = [state.grid[b] for b in rows]
        experts = torch.zeros(len(rows), dtype=torch.long)
        probs = None
        if cfg.compressor == "dpn":
            x = state.router_inputs()[rows]  # (n, d)
            if routing.inputs is not None:
                routing.inputs[rows, dpe_idx] = x.detach().float().cpu()
            logits = self.routers[str(layer)](x)  # (n, E)
            probs = torch.softmax(logits / cfg.gate_temperature, dim=-1)  # (n, E) fp32
            valid = valid_experts(grids, cfg.experts, cfg.min_tokens_after_pool)
            if self.training and cfg.router_objective == "counterfactual":
                # The LLM learns every path equally; the routers are fitted afterwards (`dpn.routing`).
                experts = torch.multinomial(valid.float(), 1).squeeze(-1)
            else:
                bias = None if self.training else cfg.effective_route_bias() * torch.tensor(cfg.expert_scores)
                experts = choose_experts(probs, valid, sample=self.training, constrain_argmax=cfg.constrain_argmax,
                                         bias=bias).cpu()
        elif cfg.compressor == "static":
            experts[:] = cfg.expert_index(cfg.static_path[dpe_idx])
        if routing.force_path is not None:
            experts = routing.force_path[rows, dpe_idx].cpu().long()
        pool = self.pool_experts[str(layer)]
        scale = probs is not None and cfg.router_objective == "reference"
        new_visual: list = [None] * B
        for r, b in enumerate(rows):
            j = int(experts[r])
            s = state.vis_start[b]
            h, w = state.grid[b]
            real = state.hidden[b][state.mask[b]]
            tokens, nh, nw = pool(real[s : s + h * w], h, w, j)  # (h'*w', d)
            if scale:
                # Scale by p[chosen] (also for keep): the only path by which the LM loss trains the router.
                tokens = tokens * probs[r, j].to(tokens.dtype)
            new_visual[b] = (tokens, nh, nw)
            routing.paths[b, dpe_idx] = j
        if probs is not None:
            routing.probs[rows, dpe_idx] = probs.detach().to(routing.probs.dtype)
            routing.routed_probs.append(probs)
        state.replace_visual(new_visual)

    def _random_paths(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values) -> torch.Tensor:
        """(B, n_dpe) expert indices of compressor "random": drawn from `random_path_shares` (or uniformly
        per DPE) with a generator seeded by the sample's own tokens and pixels, so that a batch routes each
        sample as it would alone; fresh draws in training."""
        cfg = self.config
        B, n_dpe, E = input_ids.shape[0], len(cfg.dpe_layers), len(cfg.experts)
        shares = cfg.random_path_shares
        labels = list(shares) if shares else None
        weights = torch.tensor([shares[k] for k in labels]) if shares else None
        seeds = None if self.training else sample_seeds(input_ids, attention_mask, pixel_values, cfg.image_token_id)
        out = torch.zeros(B, n_dpe, dtype=torch.long)
        for b in range(B):
            gen = None if seeds is None else torch.Generator().manual_seed(seeds[b])
            if labels is None:
                out[b] = torch.randint(0, E, (n_dpe,), generator=gen)
            else:
                path = parse_path(labels[int(torch.multinomial(weights, 1, generator=gen))])
                out[b] = torch.tensor([cfg.expert_index(f) for f in path])
        return out

    # ----- FastV / PyramidDrop ------------------------------------------------------------------
    def _prune_visual(self, state: _SequenceState, layer: nn.Module, rank_hidden, position_embeddings, keep_ratio) -> bool:
        """Keep, per sample, the `kept_count(n, keep_ratio)` visual tokens that its query tokens attend to
        most in `layer` run on `rank_hidden` (`dpn.pruning.query_attention`), in their original order.
        Returns False (nothing changed) when no sample has tokens to drop."""
        counts = state.visual_counts()
        keep = [kept_count(n, keep_ratio) for n in counts]
        rows = [b for b, (n, k) in enumerate(zip(counts, keep, strict=True)) if k < n]
        if not rows:
            return False
        scores = query_attention(layer, rank_hidden, state.mask, position_embeddings, state.query_weight)  # (B, L)
        starts = state.visual_offsets()
        new_visual: list = [None] * len(counts)
        for b in rows:
            s, n = starts[b], counts[b]
            idx = top_visual(scores[b, s : s + n], keep[b]) + s  # (k,) in the padded layout
            # Indexing (not a copy of detached values): in training the kept tokens pass gradients through.
            new_visual[b] = (state.hidden[b, idx], 1, keep[b])
        state.replace_visual(new_visual)
        return True

    # ----- forward ----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: DPNCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        force_path: torch.Tensor | None = None,
        route_index: torch.Tensor | None = None,
        output_router_inputs: bool = False,
        return_logits: bool = True,
        **kwargs,
    ) -> DPNOutput:
        """Prefill (no cache, or an empty one) runs the pyramid; a call with a filled `cache` is a decode
        step: the new tokens attend to each layer's own cache, nothing is pooled.

        Args:
            input_ids: (B, L) with `num_image_tokens` image tokens per image sample (HF Llava convention).
            pixel_values: (N, 3, H, W), one image per sample holding image tokens, in sample order.
            attention_mask: (B, L) 1 = real token; left or right padding.
            labels: (B, L) in the input layout (IGNORE_INDEX where not supervised); shifted internally.
            force_path: (B, n_dpe) expert indices to use instead of the router (ablations, tests, the
                fixed paths of a dpn model's own weights).
            output_router_inputs: also return what each router read (`DPNOutput.router_inputs`), for
                fitting routers (`dpn.routing`).
            return_logits: False (with `labels`): the LM head runs on the supervised positions only and
                `logits` is None -- training and calibration need the losses, not (B, L, V) logits.
            route_index: (B,) input position of each sample's last prompt token: the router reads it in
                samples without a `<ROUTER>` token, and FastV / PDrop rank visual tokens by its attention
                (without it: the token before each supervised span if `labels`, else the last real token;
                see `dpn.pruning.query_weights`).
            logits_to_keep: if > 0, only the last that many positions get logits (generation): the last
                real tokens of each sample, whatever the padding (`last_real_positions`).
        """
        if cache is not None and cache.stage_masks:
            return self._decode_step(input_ids, cache, attention_mask, logits_to_keep)
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.bool()
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} differs from input_ids shape {tuple(input_ids.shape)}")
        if not return_logits and labels is None:
            raise ValueError("return_logits=False needs labels (it computes the loss only)")
        if labels is not None and logits_to_keep:
            raise ValueError("labels cannot be combined with logits_to_keep")

        state = self._prefill_state(input_ids, pixel_values, attention_mask, labels, route_index)
        if force_path is None and self.config.compressor == "random":
            force_path = self._random_paths(input_ids, attention_mask, pixel_values)
        routing = self._new_routing(input_ids.shape[0], force_path, output_router_inputs)
        if use_cache and cache is None:
            cache = DPNCache(self.config.text_config)
        vis_counts, txt_counts = self._run_layers(state, routing, cache, use_cache)

        hidden = self.decoder.norm(state.hidden)
        out_mask = state.mask
        if logits_to_keep:
            hidden, out_mask = last_real_positions(hidden, state.mask, logits_to_keep)
        logits = self.language_model.lm_head(hidden) if return_logits else None  # (B, L_last, V)
        losses = self._losses(hidden, logits, state.targets, routing) if state.targets is not None else {}
        return DPNOutput(
            **losses,
            logits=logits,
            cache=cache,
            attention_mask=out_mask,
            routing_paths=routing.paths.to(device),
            routing_probs=routing.probs.to(device),
            visual_tokens_per_layer=vis_counts.to(device),
            text_tokens_per_layer=txt_counts.to(device),
            router_inputs=None if routing.inputs is None else routing.inputs.to(device),
        )

    def _prefill_state(self, input_ids, pixel_values, attention_mask, labels, route_index) -> _SequenceState:
        """The prefill's sequence state: embeddings with the image features in place, each sample's visual
        span and grid, the shifted targets, and the positions the router / the pruning query reads."""
        cfg = self.config
        left_pad = padding_side_of(attention_mask) != "right"
        embeds, vis_start, grid = self._embed_inputs(input_ids, pixel_values, attention_mask)
        targets = None
        if labels is not None:
            # Shift in the input layout: targets[t] is what position t predicts.
            targets = torch.full_like(labels, IGNORE_INDEX)
            targets[:, :-1] = labels[:, 1:]
            targets = targets.masked_fill(~attention_mask, IGNORE_INDEX)
        route_w = self._route_weights(input_ids, attention_mask, labels, cfg.router_token_id, route_index)
        query_w = query_weights(attention_mask, labels, route_index) if cfg.compressor in PRUNING else None
        return _SequenceState(embeds, attention_mask, vis_start, list(grid), targets, route_w, left_pad, query_w)

    def _new_routing(self, batch: int, force_path: torch.Tensor | None, output_router_inputs: bool) -> _Routing:
        cfg = self.config
        n_dpe = len(cfg.dpe_layers)
        return _Routing(
            paths=torch.full((batch, n_dpe), -1, dtype=torch.long), probs=torch.zeros(batch, n_dpe, len(cfg.experts)),
            routed_probs=[], force_path=force_path,
            inputs=torch.zeros(batch, n_dpe, cfg.text_config.hidden_size) if output_router_inputs else None,
        )

    def _run_layers(self, state: _SequenceState, routing: _Routing, cache: DPNCache | None, use_cache: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the decoder layers over `state`, pooling at the DPE layers (or pruning, FastV / PDrop) as
        the compressor says. Returns the visual and text token counts each layer saw, (B, n_layers) each."""
        cfg = self.config
        layers = self.decoder.layers
        B, n_layers = state.hidden.shape[0], len(layers)
        dpe = {layer: k for k, layer in enumerate(cfg.dpe_layers)} if cfg.compressor in POOLING else {}
        # FastV ranks by the attention of the last layer that sees every visual token (K-1) and prunes on
        # entering layer K, as its code does; PDrop ranks by each of its layers' own attention, before it.
        fastv_rank_layer = cfg.fastv_layer - 1 if cfg.compressor == "fastv" else -1
        pdrop_layers = set(cfg.pdrop_layers) if cfg.compressor == "pdrop" else set()
        vis_counts = torch.zeros(B, n_layers, dtype=torch.long)
        txt_counts = torch.zeros(B, n_layers, dtype=torch.long)
        stage_inputs = None  # (attention mask, rotary embeddings, position ids) of the current stage
        for i, layer in enumerate(layers):
            if i in dpe and cfg.location == "pre":
                self._apply_dpe(state, i, dpe[i], routing)
                stage_inputs = None
            if i in pdrop_layers:
                rope = stage_inputs[1] if stage_inputs is not None else self._rotary(state)
                if self._prune_visual(state, layer, state.hidden, rope, cfg.pdrop_ratio):
                    stage_inputs = None
            if stage_inputs is None:
                stage_inputs = self._stage_inputs(state, cache)
            attn_mask, pos_emb, pos_ids = stage_inputs
            vis_counts[:, i] = torch.tensor(state.visual_counts())
            txt_counts[:, i] = torch.tensor(state.text_counts())
            if cache is not None:
                cache.layer_stage.append(len(cache.stage_masks) - 1)
            layer_input = state.hidden
            state.hidden = layer(
                state.hidden,
                attention_mask=attn_mask,
                position_ids=pos_ids,
                position_embeddings=pos_emb,
                cache=cache,
                use_cache=use_cache,
            )
            if i in dpe and cfg.location == "post":
                self._apply_dpe(state, i, dpe[i], routing)
                stage_inputs = None
            if i == fastv_rank_layer and self._prune_visual(state, layer, layer_input, pos_emb, 1.0 - cfg.fastv_ratio):
                stage_inputs = None
        return vis_counts, txt_counts

    def _losses(self, hidden: torch.Tensor, logits: torch.Tensor | None, targets: torch.Tensor,
                routing: _Routing) -> dict[str, torch.Tensor | None]:
        """LM loss over the supervised positions (token-mean over the batch, and per sample), plus the
        reference routing loss for dpn: the `loss` / `lm_loss` / `route_loss` / `num_label_tokens` /
        `sample_loss` fields of `DPNOutput`."""
        cfg = self.config
        sup = targets != IGNORE_INDEX  # (B, L_last)
        n_sup = sup.sum()
        token_ce = torch.zeros(sup.shape, dtype=torch.float32, device=hidden.device)  # (B, L_last)
        if int(n_sup) > 0:
            # Only supervised positions need logits: at 7B the LM head is a 32000 x 4096 matmul per token.
            sup_logits = logits[sup] if logits is not None else self.language_model.lm_head(hidden[sup])  # (n_sup, V)
            token_ce[sup] = F.cross_entropy(sup_logits.float(), targets[sup], reduction="none")
        per_sample = sup.sum(-1)  # (B,)
        sample_loss = (token_ce.sum(-1) / per_sample.clamp(min=1)).detach()
        if int(n_sup) > 0:
            lm_loss = token_ce.sum() / n_sup
        else:  # every sample masked (e.g. tokenization mismatches): zero loss that keeps the graph
            lm_loss = hidden.sum() * 0.0
        loss, route_loss = lm_loss, None
        if cfg.compressor == "dpn" and cfg.router_objective == "reference":
            probs = torch.cat(routing.routed_probs) if routing.routed_probs else hidden.new_zeros(0, len(cfg.experts))
            route_loss = routing_loss(probs, torch.tensor(cfg.expert_scores), cfg.route_loss_target)
            loss = lm_loss + cfg.route_loss_coef * route_loss
        return {"loss": loss, "lm_loss": lm_loss, "route_loss": route_loss, "num_label_tokens": n_sup,
                "sample_loss": sample_loss}

    def generate(self, input_ids: torch.Tensor, **kwargs):
        """Greedy or sampled generation with per-layer KV caches; see `dpn.generation.generate`."""
        return _generate(self, input_ids, **kwargs)

    def _rotary(self, state: _SequenceState):
        # (cos, sin), each (B, L, hd), for the current layout's contiguous positions.
        return self.decoder.rotary_emb(state.hidden, position_ids=state.positions)

    def _attention_mask(self, kv_mask: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The additive mask of `build_attention_mask`, or None where nothing is padded and the attention
        applies causality itself: a single new token (it sees every key), or a prefill under SDPA, whose
        `is_causal` path lets the kernels skip the masked half instead of computing and discarding it."""
        if bool(kv_mask.all()):
            if q_len == 1:
                return None
            if q_len == kv_mask.shape[-1] and self.decoder.config._attn_implementation == "sdpa":
                return None
        return build_attention_mask(kv_mask, q_len, dtype)

    def _stage_inputs(self, state: _SequenceState, cache: DPNCache | None):
        """Attention mask, rotary embeddings and positions for a stage that starts now (prefill)."""
        attn_mask = self._attention_mask(state.mask, state.mask.shape[1], state.hidden.dtype)
        pos_ids = state.positions
        pos_emb = self.decoder.rotary_emb(state.hidden, position_ids=pos_ids)
        if cache is not None:
            cache.stage_masks.append(state.mask)
        return attn_mask, pos_emb, pos_ids

    def _decode_step(self, input_ids, cache: DPNCache, attention_mask, logits_to_keep) -> DPNOutput:
        """New tokens (B, q) attend to each layer's own cache; positions continue each stage's count."""
        if (input_ids == self.config.image_token_id).any():
            raise ValueError("image tokens are only accepted in the prefill, not in decode steps")
        B, q = input_ids.shape
        new_mask = torch.ones(B, q, dtype=torch.bool, device=input_ids.device)
        if attention_mask is not None and attention_mask.shape[-1] == q:
            new_mask = attention_mask.bool()
        hidden = self.get_input_embeddings()(input_ids)  # (B, q, d)
        stage_inputs = {}
        for s, old in enumerate(cache.stage_masks):
            pos_ids = cache.next_positions(s)[:, None] + new_mask.long().cumsum(-1) - 1  # (B, q)
            kv_mask = torch.cat([old, new_mask], dim=-1)
            stage_inputs[s] = (
                self._attention_mask(kv_mask, q, hidden.dtype),
                self.decoder.rotary_emb(hidden, position_ids=pos_ids),
                pos_ids,
                kv_mask,
            )
        for i, layer in enumerate(self.decoder.layers):
            attn_mask, pos_emb, pos_ids, _ = stage_inputs[cache.layer_stage[i]]
            hidden = layer(
                hidden, attention_mask=attn_mask, position_ids=pos_ids, position_embeddings=pos_emb, cache=cache, use_cache=True
            )
        cache.stage_masks = [stage_inputs[s][3] for s in range(len(cache.stage_masks))]
        hidden = self.decoder.norm(hidden)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return DPNOutput(logits=self.language_model.lm_head(hidden), cache=cache, attention_mask=cache.stage_masks[-1])


# `AutoModelForImageTextToText.from_pretrained(dpn_checkpoint)` builds this class (AutoConfig knows DPNConfig,
# see dpn.configuration_dpn). A registry entry, no I/O.
AutoModelForImageTextToText.register(DPNConfig, DPNForConditionalGeneration, exist_ok=True)


__all__ = [
    "DPNForConditionalGeneration",
    "DPNPreTrainedModel",
    "DPNCache",
    "DPNOutput",
    "build_attention_mask",
    "last_real_positions",
]
