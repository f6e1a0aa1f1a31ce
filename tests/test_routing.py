"""Router fitting and the compute-budget knob (dpn/routing.py) on the test-tiny geometry: the calibration
tables, the cost-to-go, replay = the model's own routing, budget curve and the budget's range check."""

from __future__ import annotations

import pytest
import torch

from dpn.constants import IGNORE_INDEX
from dpn.modeling_dpn import DPNForConditionalGeneration
from dpn.presets import test_tiny
from dpn.routing import (
    CalibrationTables,
    all_paths,
    budget_curve,
    calibration_pass,
    cost_to_go,
    fit_routers,
    mu_for_fraction,
    replay,
    set_budget,
)

IMG, ROUTER = 60, 61
N_IMG = test_tiny().num_image_tokens  # 64 = 8 x 8


def batches(n_batches=6, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        prompts = [[1, int(t)] + [IMG] * N_IMG + [7, 8, ROUTER, 9, 10] for t in torch.randint(3, 50, (B,), generator=g)]
        ids = torch.tensor(prompts)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, -2:] = ids[:, -2:]
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                    "pixel_values": torch.randn(B, 3, 16, 16, generator=g)})
    return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DPNForConditionalGeneration(test_tiny(compressor="dpn", router_token_id=ROUTER,
                                              router_objective="counterfactual")).eval()
    for r in m.routers.values():  # opinionated routers: samples take different paths
        torch.nn.init.normal_(r.fc1.weight, std=0.02)  # small first layer, large second: opinionated
        torch.nn.init.normal_(r.fc2.weight, std=5.0)
    return m


@pytest.fixture(scope="module")
def tables(model):
    return calibration_pass(model, batches())


def test_tables_hold_every_path_and_every_prefix_state(model, tables):
    assert tables.paths == all_paths(model.config) and len(tables.paths) == 27
    assert tables.loss.shape == tables.flops_fraction.shape == (24, 27)
    # keep-keep-keep costs the uncompressed FLOPs; quarter first is cheaper than keep first
    keep = tables.paths.index((0, 0, 0))
    assert torch.allclose(tables.flops_fraction[:, keep], torch.ones(24))
    assert (tables.flops_fraction[:, tables.paths.index((2, 0, 0))] < 1).all()
    assert sorted(tables.states, key=lambda p: (len(p), p))[:4] == [(), (0,), (1,), (2,)]
    assert len(tables.states) == 1 + 3 + 9
    # 8x8 -(2,2)-> 4x4 = 16 -(2,2)-> 2x2 = 4 < 16: the third DPE does not pool after two quarters
    assert not tables.routed[(2, 2)].any() and tables.routed[(0, 0)].all()
    # a forced path's loss is the forward's own per-sample loss
    b = batches()[0]
    out = model(**b, force_path=torch.tensor([[1, 0, 2]] * 4))
    assert torch.allclose(tables.loss[:4, tables.paths.index((1, 0, 2))], out.sample_loss, atol=1e-5)


def test_cost_to_go_is_the_least_cost_over_completions():
    paths = all_paths(test_tiny())
    g = torch.Generator().manual_seed(1)
    t = CalibrationTables(paths=paths, loss=torch.rand(5, 27, generator=g), flops_fraction=torch.rand(5, 27, generator=g))
    q = cost_to_go(t, mu=0.5)
    cost = t.loss + 0.5 * t.flops_fraction
    for prefix in [(), (1,), (2, 0)]:
        for j in range(3):
            rows = [i for i, p in enumerate(paths) if p[: len(prefix) + 1] == prefix + (j,)]
            assert torch.allclose(q[prefix][:, j], cost[:, rows].min(-1).values)
    # the root's best expert leads to the overall best path
    assert torch.equal(q[()].min(-1).values, cost.min(-1).values)


def test_replay_is_the_models_own_routing_at_every_bias(model, tables):
    for bias in (-3.0, 0.0, 0.7, 4.0):
        model.config.route_bias = bias
        got = []
        with torch.no_grad():
            for b in batches():
                got += [tuple(p) for p in model(**b).routing_paths.tolist()]
        want = [tables.paths[i] for i in replay(model, tables, bias).tolist()]
        # a DPE that did not pool (-1) took whatever the replay chose there: compare where it pooled
        for g, w in zip(got, want, strict=True):
            assert all(gj == wj for gj, wj in zip(g, w, strict=True) if gj >= 0), (bias, g, w)
    model.config.route_bias = 0.0


def test_fitted_routers_follow_the_costs(tables):
    torch.manual_seed(0)
    m = DPNForConditionalGeneration(test_tiny(compressor="dpn", router_token_id=ROUTER)).eval()
    # Costs that depend on the state only through a visible feature: sample i prefers quarter at the first
    # DPE iff its router input's first coordinate is positive.
    t = CalibrationTables(paths=tables.paths, loss=torch.zeros_like(tables.loss), flops_fraction=tables.flops_fraction,
                          states=dict(tables.states), routed=dict(tables.routed))
    sign = (t.states[()][:, 0] > t.states[()][:, 0].median()).float()
    first = torch.tensor([p[0] for p in t.paths])
    t.loss = (1 - sign)[:, None] * (first[None] == 2).float() * 5.0  # the others pay 5 for quartering first
    report = fit_routers(m, t, mu=1.0, tau=0.05, steps=200, val_fraction=0.25)
    assert report.val_agreement_pct > 60
    idx = replay(m, t, 0.0)
    chosen_first = torch.tensor([t.paths[i][0] for i in idx.tolist()])
    assert (chosen_first[sign == 1] == 2).float().mean() > 0.8  # free to compress: they compress
    assert (chosen_first[sign == 0] != 2).float().mean() > 0.8


def test_mu_for_fraction_hits_the_oracle_mean(tables):
    mu = mu_for_fraction(tables, 0.8)
    idx = (tables.loss + mu * tables.flops_fraction).argmin(-1)
    assert float(tables.flops_fraction.gather(1, idx[:, None]).mean()) <= 0.8 + 1e-6


@pytest.fixture(scope="module")
def fitted(tables):
    """Routers fitted to random per-sample costs: every sample has its own preferences."""
    torch.manual_seed(0)
    m = DPNForConditionalGeneration(test_tiny(compressor="dpn", router_token_id=ROUTER)).eval()
    t = CalibrationTables(paths=tables.paths, loss=torch.rand(tables.loss.shape, generator=torch.Generator().manual_seed(2)),
                          flops_fraction=tables.flops_fraction, states=dict(tables.states), routed=dict(tables.routed))
    fit_routers(m, t, mu=0.5, tau=0.1, steps=300, val_fraction=0.0)
    return m


def test_budget_curve_and_budget_knob(fitted, tables):
    model = fitted
    curve = budget_curve(model, tables)
    fr = curve["flops_fraction"]
    assert fr[0] == pytest.approx(1.0)  # a strong negative bias keeps everything
    assert fr[-1] < 0.6  # a strong positive bias compresses at every DPE
    assert all(b >= a - 0.05 for a, b in zip(fr[1:], fr[:-1], strict=True)), "falls as the bias rises"
    lo, hi = min(fr), max(fr)
    target = (lo + hi) / 2
    bias = set_budget(model, target, curve)
    assert model.config.budget == pytest.approx(target) and model.config.effective_route_bias() == bias
    got = float(tables.flops_fraction.gather(1, replay(model, tables, bias)[:, None]).mean())
    assert abs(got - target) < 0.05, (got, target)
    with pytest.raises(ValueError, match=r"budget 0.05 is outside .*\[0\.\d+, 1\.000\]"):
        set_budget(model, 0.05)
    set_budget(model, None)
    assert model.config.route_bias == 0.0 and model.config.budget is None


def test_budget_round_trips_through_save_pretrained(fitted, tables, tmp_path):
    model = fitted
    curve = budget_curve(model, tables, [-40, 0, 40])
    set_budget(model, 0.9, curve)
    model.save_pretrained(tmp_path)
    again = DPNForConditionalGeneration.from_pretrained(tmp_path)
    assert again.config.budget == pytest.approx(0.9)
    assert again.config.effective_route_bias() == pytest.approx(model.config.effective_route_bias())
    assert DPNForConditionalGeneration.from_pretrained(tmp_path, budget=1.0).config.effective_route_bias() < 0
    with pytest.raises(ValueError, match="outside"):
        DPNForConditionalGeneration.from_pretrained(tmp_path, budget=0.01)
    set_budget(model, None)


def test_budget_pass_without_losses_sees_every_state_and_prices_every_path(model, tables):
    light = calibration_pass(model, batches(), losses=False)
    assert torch.isnan(light.loss).all()
    assert torch.allclose(light.flops_fraction, tables.flops_fraction, atol=1e-6)
    assert set(light.states) == set(tables.states)
    for prefix, x in tables.states.items():
        assert torch.allclose(light.states[prefix], x, atol=1e-5)


# ----- the random-routing control, router fidelity details -----------------------------------------------
def test_random_compressor_draws_per_sample_as_alone_and_follows_the_shares():
    torch.manual_seed(0)
    shares = {"4-2-1": 3.0, "1-1-1": 1.0}
    model = DPNForConditionalGeneration(test_tiny(compressor="random", random_path_shares=shares)).eval()
    b = batches(n_batches=1, B=8, seed=3)[0]
    with torch.no_grad():
        out = model(b["input_ids"], pixel_values=b["pixel_values"], attention_mask=b["attention_mask"])
        for i in range(8):
            alone = model(b["input_ids"][i : i + 1], pixel_values=b["pixel_values"][i : i + 1])
            assert alone.routing_paths[0].tolist() == out.routing_paths[i].tolist()
    # 8x8 -> 4-2-1: [2, 1, -1] (the third DPE sees 8 < 16 tokens); 1-1-1: [0, 0, 0]
    assert {tuple(p) for p in out.routing_paths.tolist()} <= {(2, 1, -1), (0, 0, 0)}
    draws = []
    with torch.no_grad():
        for seed in range(12):
            bb = batches(n_batches=1, B=8, seed=100 + seed)[0]
            draws += [tuple(p) for p in model(bb["input_ids"], pixel_values=bb["pixel_values"]).routing_paths.tolist()]
    share = sum(p == (2, 1, -1) for p in draws) / len(draws)
    assert 0.6 < share < 0.9, share  # 3:1
    with pytest.raises(ValueError, match="random_path_shares"):
        test_tiny(compressor="random", random_path_shares={"4-2": 1.0})


def test_router_versions_and_reference_init():
    import math

    from dpn.pyramid import DPNRouter

    torch.manual_seed(0)
    m = DPNForConditionalGeneration(test_tiny(compressor="dpn", router_version="linear"))
    r = next(iter(m.routers.values()))
    assert isinstance(r, DPNRouter) and isinstance(r.norm, torch.nn.Identity)  # the ablation has no LayerNorm
    bound = 1 / math.sqrt(r.fc.weight.shape[1])  # kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), ..)
    assert r.fc.weight.abs().max() <= bound and r.fc.weight.abs().max() > 0.8 * bound
    mlp = next(iter(DPNForConditionalGeneration(test_tiny(compressor="dpn")).routers.values()))
    assert isinstance(mlp.norm, torch.nn.LayerNorm)
    assert mlp.fc2.weight.abs().max() <= 1 / math.sqrt(mlp.fc2.weight.shape[1])


def test_13b_preset_places_dpes_as_the_reference_with_quarters_as_an_option():
    from dpn.presets import get_preset

    assert get_preset("llava-1.5-13b").dpe_layers == [7, 15, 23]
    assert get_preset("llava-1.5-13b", dpe_placement="quarters").dpe_layers == [9, 19, 29]
    assert get_preset("llava-1.5-7b").dpe_layers == [7, 15, 23]
    with pytest.raises(ValueError, match="dpe_placement"):
        get_preset("llava-1.5-13b", dpe_placement="thirds")


def test_flops_floor_is_the_cheapest_path_without_text():
    from dpn.presets import get_preset
    from dpn.routing import flops_floor

    cfg = get_preset("llava-1.5-7b")
    floor = flops_floor(cfg)
    # 4-4-4 at 7B geometry: 576 visual tokens for 8 layers, 144, 36, 9 for 8 each; every path costs more
    assert 0.2 < floor < 0.4
    with pytest.raises(ValueError, match=r"routing.budget: 0.1 is below .* at least 0\.\d+"):
        from pipelines.workflow import tiny_pipeline

        tiny_pipeline(routing={"budget": 0.1})
