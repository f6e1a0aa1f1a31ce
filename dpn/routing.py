"""Fitting and steering the routers on held-out data (single device, torch only).

Why a calibration pass: the paper's objective (`router_objective="reference"`) reaches the router only
through p[chosen] scaling the pooled tokens, plus a hinge that pushes towards compression; nothing tells
a router what the paths it did *not* take would have cost, so routers collapse onto one path
(`../shared/docs/dpn-method.md`, "Why routers collapse"). The "counterfactual" objective measures it:

1. Stage 2 trains the LLM on uniformly sampled paths (`DPNConfig.router_objective="counterfactual"`), so
   every path of the pyramid is a trained path of the same weights.
2. `calibration_pass` runs each held-out sample down every path (3 experts ^ 3 DPEs = 27 at most) and
   records its loss and prefill FLOPs fraction on each, plus what each router reads after every prefix
   of choices (13 states for 3 DPEs): the tables behind everything below.
3. `fit_routers` trains each DPE's router on those states towards soft targets: the cost-to-go of each
   expert, cost = loss + mu * FLOPs fraction, minimised over the remaining choices (dynamic programming
   over the tree of paths), softmax(-cost / tau). Every prefix state is a training state, not only the
   best path's, so that a router still chooses well after an earlier router was pushed off its favourite
   by the budget knob.
4. `budget_curve` replays the routers on the stored states for a range of `route_bias` values (the
   budget knob: argmax(log p + bias * log2 factor)) and reads each sample's FLOPs fraction from the
   table: mean FLOPs fraction against bias without another forward pass. `DPNConfig.budget` interpolates
   it.

The same pass serves a reference-trained model (steps 2 and 4, no fitting), so every dpn model gets a
budget knob.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dpn.flops import analytic_token_counts, llm_prefill_flops


def all_paths(config) -> list[tuple[int, ...]]:
    """Every expert-index path (one expert per DPE), keep-first order: (0, 0, 0), (0, 0, 1), ..."""
    return list(itertools.product(range(len(config.experts)), repeat=len(config.dpe_layers)))


@dataclass
class CalibrationTables:
    """What `calibration_pass` measured, per held-out sample (N image samples, P = all_paths)."""

    paths: list[tuple[int, ...]]
    loss: torch.Tensor  # (N, P) mean CE over the sample's supervised tokens on each path
    flops_fraction: torch.Tensor  # (N, P) LLM prefill FLOPs on each path / uncompressed
    states: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)  # prefix -> (N, d) router input
    routed: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)  # prefix -> (N,) bool: pooled there

    @property
    def num_samples(self) -> int:
        return self.loss.shape[0]

    def path_index(self) -> dict[tuple[int, ...], int]:
        return {p: i for i, p in enumerate(self.paths)}

    def subset(self, rows: torch.Tensor) -> CalibrationTables:
        return CalibrationTables(
            paths=self.paths, loss=self.loss[rows], flops_fraction=self.flops_fraction[rows],
            states={k: v[rows] for k, v in self.states.items()}, routed={k: v[rows] for k, v in self.routed.items()},
        )


@torch.no_grad()
def calibration_pass(model, batches: Iterable[Mapping[str, torch.Tensor]], losses: bool = True) -> CalibrationTables:
    """Run every image sample of `batches` (dicts of model inputs with `labels`) down every path.

    Text-only samples are skipped (nothing to route). The model must be a `compressor="dpn"` model; it
    is put in eval mode. Cost: P forward passes per batch (27 for the default pyramid). With
    `losses=False` (what a budget curve needs) only the paths that end on "keep" run -- each visits a
    different prefix of the last DPE, so together they see every router state -- and the other paths'
    FLOPs fractions come from the token-count arithmetic (`dpn.flops.analytic_token_counts`); `loss` is
    then NaN.
    """
    cfg = model.config
    if cfg.compressor != "dpn":
        raise ValueError(f"the calibration pass needs a compressor='dpn' model (routers), got {cfg.compressor!r}")
    model.eval()
    device = next(model.parameters()).device
    paths = all_paths(cfg)
    tc = cfg.text_config
    all_loss, fracs = [], []
    states: dict[tuple[int, ...], list[torch.Tensor]] = {}
    routed: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for batch in batches:
        if "pixel_values" not in batch:
            continue
        keep = (batch["input_ids"] == cfg.image_token_id).any(-1)  # (B,) image samples
        if not bool(keep.all()):
            raise ValueError("calibration batches must hold image samples only (single-modality micro-batches)")
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels", "pixel_values")}
        B = inputs["input_ids"].shape[0]
        loss_b = torch.full((B, len(paths)), math.nan)
        frac_b = torch.zeros(B, len(paths))
        seen: set[tuple[int, ...]] = set()
        n_text = None
        for pi, path in enumerate(paths):
            if not losses and path[-1] != 0:
                continue
            force = torch.tensor(path, device=device).expand(B, -1)
            out = model(**inputs, force_path=force, output_router_inputs=True, return_logits=not losses)
            if losses:
                loss_b[:, pi] = out.sample_loss.float().cpu()
            vis, txt = out.visual_tokens_per_layer.cpu(), out.text_tokens_per_layer.cpu()
            n_text = txt[:, 0].tolist()
            for b in range(B):
                full = llm_prefill_flops(tc, [int(vis[b, 0] + txt[b, 0])] * vis.shape[1])
                frac_b[b, pi] = llm_prefill_flops(tc, (vis[b] + txt[b]).tolist()) / full
            for k in range(len(path)):
                prefix = path[:k]
                if prefix in seen:
                    continue
                seen.add(prefix)
                states.setdefault(prefix, []).append(out.router_inputs[:, k].float().cpu())
                routed.setdefault(prefix, []).append(out.routing_paths[:, k].cpu() >= 0)
        if not losses:  # the paths not run: FLOPs from the token counts they would give
            factors = cfg.expert_factors
            for pi, path in enumerate(paths):
                if path[-1] == 0:
                    continue
                for b in range(B):
                    vis, txt = analytic_token_counts(cfg, n_text[b], [factors[j] for j in path], "dpn")
                    full = llm_prefill_flops(tc, [vis[0] + txt[0]] * len(vis))
                    frac_b[b, pi] = llm_prefill_flops(tc, [v + t for v, t in zip(vis, txt, strict=True)]) / full
        all_loss.append(loss_b)
        fracs.append(frac_b)
    if not all_loss:
        raise ValueError("the calibration data holds no image sample")
    return CalibrationTables(
        paths=paths, loss=torch.cat(all_loss), flops_fraction=torch.cat(fracs),
        states={k: torch.cat(v) for k, v in states.items()}, routed={k: torch.cat(v) for k, v in routed.items()},
    )


def cost_to_go(tables: CalibrationTables, mu: float) -> dict[tuple[int, ...], torch.Tensor]:
    """prefix -> (N, E): least cost (loss + mu * FLOPs fraction) over the paths that continue the prefix
    with each expert. Computed leaves-up over the tree of paths."""
    cost = tables.loss + mu * tables.flops_fraction  # (N, P)
    n_dpe = len(tables.paths[0])
    n_exp = max(p[0] for p in tables.paths) + 1
    index = tables.path_index()
    value: dict[tuple[int, ...], torch.Tensor] = {p: cost[:, index[p]] for p in tables.paths}  # (N,)
    q: dict[tuple[int, ...], torch.Tensor] = {}
    for depth in range(n_dpe - 1, -1, -1):
        for prefix in itertools.product(range(n_exp), repeat=depth):
            q[prefix] = torch.stack([value[prefix + (j,)] for j in range(n_exp)], dim=-1)  # (N, E)
            value[prefix] = q[prefix].min(-1).values
    return q


def oracle_paths(tables: CalibrationTables, mu: float) -> torch.Tensor:
    """(N,) index into `tables.paths` of each sample's least-cost path."""
    return (tables.loss + mu * tables.flops_fraction).argmin(-1)


def mu_for_fraction(tables: CalibrationTables, fraction: float, iters: int = 60) -> float:
    """The compute price mu at which the per-sample least-cost paths use `fraction` of the uncompressed
    FLOPs on average (bisection; the mean fraction falls as mu rises)."""
    def mean_frac(mu: float) -> float:
        idx = oracle_paths(tables, mu)
        return float(tables.flops_fraction.gather(1, idx[:, None]).mean())

    lo, hi = 0.0, 1.0
    while mean_frac(hi) > fraction and hi < 1e6:
        hi *= 2
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_frac(mid) > fraction else (lo, mid)
    return hi


@dataclass(kw_only=True)
class FitReport:
    mu: float
    tau: float
    steps: int
    train_loss: float
    val_agreement_pct: float  # argmax of each fitted router == argmin of the cost-to-go, held-out states
    val_states: int


def fit_routers(
    model,
    tables: CalibrationTables,
    *,
    mu: float,
    tau: float = 0.05,
    steps: int = 400,
    lr: float = 1e-2,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> FitReport:
    """Train every router of `model` on the prefix states of `tables` towards softmax(-cost-to-go / tau)
    (cost = loss + mu * FLOPs fraction), full batch, AdamW; keeps the step with the least held-out loss
    on `val_fraction` of the samples. Each router's input is first standardised with the training
    states' mean and std (`DPNRouter.input_shift` / `input_scale`)."""
    cfg = model.config
    q = cost_to_go(tables, mu)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(tables.num_samples, generator=gen)
    n_val = int(round(val_fraction * tables.num_samples))
    val_rows, train_rows = order[:n_val], order[n_val:]
    routers = {k: model.routers[str(layer)] for k, layer in enumerate(cfg.dpe_layers)}
    device = next(model.parameters()).device

    def gather(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, qs = [], []
        for prefix, x in tables.states.items():
            if len(prefix) != k:
                continue
            mask = tables.routed[prefix][rows]
            xs.append(x[rows][mask])
            qs.append(q[prefix][rows][mask])
        return torch.cat(xs).to(device), torch.cat(qs).to(device)

    data = {k: (gather(train_rows, k), gather(val_rows, k)) for k in routers}
    with torch.no_grad():
        for k, r in routers.items():
            x = data[k][0][0]
            if len(x) > 1:
                r.input_shift.copy_(x.mean(0))
                r.input_scale.copy_(1.0 / x.std(0).clamp(min=1e-6))
    params = [p for r in routers.values() for p in r.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def objective(split: int) -> torch.Tensor:
        total = 0.0
        for k, r in routers.items():
            x, qv = data[k][split]
            if len(x):
                target = torch.softmax(-qv / tau, dim=-1)  # (n, E)
                logp = F.log_softmax(r(x) / cfg.gate_temperature, dim=-1)
                total = total + -(target * logp).sum(-1).mean()
        return total if torch.is_tensor(total) else torch.zeros(())

    def agreement() -> tuple[int, int]:
        hit = total = 0
        with torch.no_grad():
            for k, r in routers.items():
                x, qv = data[k][1]
                if len(x):
                    hit += int((r(x).argmax(-1) == qv.argmin(-1)).sum())
                    total += len(x)
        return hit, total

    for r in routers.values():
        r.train()
    best = (math.inf, None, 0)
    last_loss = math.nan
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = objective(0)
        loss.backward()
        opt.step()
        last_loss = float(loss.detach())
        if step % 10 == 0 or step == steps:
            with torch.no_grad():
                val = float(objective(1)) if n_val else -step  # no held-out samples: the last step
            if val < best[0]:
                best = (val, {k: {n: t.detach().clone() for n, t in r.state_dict().items()} for k, r in routers.items()}, step)
    for k, r in routers.items():
        r.load_state_dict(best[1][k])
        r.eval()
    hit, total = agreement()
    return FitReport(mu=mu, tau=tau, steps=best[2], train_loss=last_loss,
                     val_agreement_pct=100 * hit / total if total else math.nan, val_states=total)


@torch.no_grad()
def replay(model, tables: CalibrationTables, bias: float) -> torch.Tensor:
    """(N,) index into `tables.paths` of the path each sample takes under `route_bias = bias`, replayed from
    the stored router inputs (the model's own argmax rule, `dpn.pyramid.choose_experts`)."""
    cfg = model.config
    device = next(model.parameters()).device
    scores = torch.tensor(cfg.expert_scores, device=device)
    n = tables.num_samples
    prefixes: list[tuple[int, ...]] = [()] * n
    for layer in cfg.dpe_layers:
        router = model.routers[str(layer)]
        choice = torch.zeros(n, dtype=torch.long)
        for prefix in set(prefixes):
            rows = torch.tensor([i for i, p in enumerate(prefixes) if p == prefix])
            logp = F.log_softmax(router(tables.states[prefix][rows].to(device)) / cfg.gate_temperature, dim=-1)
            choice[rows] = (logp + bias * scores).argmax(-1).cpu()
        prefixes = [p + (int(c),) for p, c in zip(prefixes, choice, strict=True)]
    index = tables.path_index()
    return torch.tensor([index[p] for p in prefixes])


def budget_curve(model, tables: CalibrationTables, biases: Iterable[float] | None = None,
                 max_step: float = 0.01, max_points: int = 400) -> dict[str, list[float]]:
    """{"bias": [...], "flops_fraction": [...]}: the mean prefill FLOPs fraction the routers reach on the
    calibration samples at each `route_bias` (replayed, no forward pass), for `DPNConfig.budget_curve`.

    The fraction is a step function of the bias (it moves when some sample's argmax flips), and the
    flips crowd into a narrow range of biases: a coarse grid (121 points over [-30, 30], or `biases`) is
    refined by bisection wherever two neighbours differ by more than `max_step`, until every step is
    resolved to 1e-4 in bias or `max_points` are spent. A step that remains (many samples flipping at the
    same bias, e.g. a collapsed router) is a budget the routers cannot hit: interpolation lands on it."""
    fraction = {}

    def at(b: float) -> float:
        if b not in fraction:
            idx = replay(model, tables, b)
            fraction[b] = float(tables.flops_fraction.gather(1, idx[:, None]).mean())
        return fraction[b]

    grid = sorted(float(b) for b in (biases if biases is not None else torch.linspace(-30, 30, 121).tolist()))
    for b in grid:
        at(b)
    if biases is None:
        pending = list(zip(grid, grid[1:], strict=False))
        while pending and len(fraction) < max_points:
            lo, hi = pending.pop()
            if abs(at(lo) - at(hi)) <= max_step or hi - lo < 1e-4:
                continue
            mid = (lo + hi) / 2
            at(mid)
            pending += [(lo, mid), (mid, hi)]
    bs = sorted(fraction)
    return {"bias": bs, "flops_fraction": [fraction[b] for b in bs], "samples": tables.num_samples}


def flops_floor(config) -> float:
    """The least prefill FLOPs fraction any routing path can reach on this geometry: the cheapest path
    with no text tokens (text is never pooled, so real samples sit above it). A budget below it can never
    be met, whatever the data."""
    factors = config.expert_factors
    tc = config.text_config
    best = 1.0
    for path in all_paths(config):
        vis, txt = analytic_token_counts(config, 0, [factors[j] for j in path], "dpn")
        full = llm_prefill_flops(tc, [vis[0] + txt[0]] * len(vis))
        best = min(best, llm_prefill_flops(tc, [v + t for v, t in zip(vis, txt, strict=True)]) / full)
    return best


def set_budget(model, budget: float | None, curve: Mapping[str, list[float]] | None = None) -> float:
    """Steer `model`'s routers to a mean prefill FLOPs `budget` (fraction of uncompressed; None = no
    bias): stores `curve` (else the model's own) and the budget in its config; returns the route_bias.
    Raises ValueError naming the reachable range for a budget the paths cannot reach."""
    cfg = model.config
    if curve is not None:
        cfg.budget_curve = {k: list(v) if k != "samples" else v for k, v in curve.items()}
        cfg._check_budget_curve()
    if budget is None:
        cfg.budget, cfg.route_bias = None, 0.0
        return 0.0
    bias = cfg.bias_for_budget(budget)
    cfg.budget = float(budget)
    return bias


__all__ = [
    "CalibrationTables",
    "FitReport",
    "all_paths",
    "budget_curve",
    "calibration_pass",
    "cost_to_go",
    "fit_routers",
    "flops_floor",
    "mu_for_fraction",
    "oracle_paths",
    "replay",
    "set_budget",
]
