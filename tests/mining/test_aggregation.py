"""mining.aggregation on synthetic DoRA adapters (pure torch: no engine, no database)."""

import math

import pytest
import torch

from mining import aggregation
from mining.aggregation import aggregate, delta, parse_adapter
from mining.models import METHOD_CHOICES

MODULES = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.0.mlp.down_proj": (16, 40)}
SCALING = 2.0


def make_adapter(seed, rank=4, spread=0.05, centre_seed=1000, modules=MODULES):
    """An 'honest' update: a shared direction (what the data teaches) plus per-miner noise."""
    centre = torch.Generator().manual_seed(centre_seed)
    own = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out, inp) in modules.items():
        A = torch.randn(rank, inp, generator=centre) * 0.3 + torch.randn(rank, inp, generator=own) * spread
        B = torch.randn(out, rank, generator=centre) * 0.3 + torch.randn(out, rank, generator=own) * spread
        m = 1 + torch.randn(out, generator=centre) * 0.1 + torch.randn(out, generator=own) * spread * 0.1
        state[f"base_model.model.{name}.lora_A.weight"] = A
        state[f"base_model.model.{name}.lora_B.weight"] = B
        state[f"base_model.model.{name}.lora_magnitude_vector"] = m
    return state


def deltas(state, scaling):
    return {name: (delta(mod, scaling), mod.m) for name, mod in parse_adapter(state, scaling).items()}


def poison(state, kind, seed=7):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, tensor in state.items():
        if kind == "scaled":
            out[key] = tensor * (10 if "lora_B" in key else 1)
        elif kind == "sign_flipped":
            out[key] = -tensor if "lora_B" in key else tensor
        elif kind == "random":
            out[key] = torch.randn(tensor.shape, generator=gen) * tensor.std() * 3
    return out


def distance_to(state, scaling, target):
    got = deltas(state, scaling)
    return math.sqrt(sum(float(((got[n][0] - target[n][0]) ** 2).sum()) for n in target))


def honest_mean(states):
    ds = [deltas(s, SCALING) for s in states]
    return {n: (sum(d[n][0] for d in ds) / len(ds), sum(d[n][1] for d in ds) / len(ds)) for n in ds[0]}


def test_methods_match_the_model_choices():
    assert [k for k, _ in METHOD_CHOICES] == list(aggregation.METHODS)


def test_weighted_mean_of_honest_submissions_equals_the_average_weight_delta_exactly():
    states = [make_adapter(i) for i in range(5)]
    weights = [10, 20, 30, 40, 50]
    state, report = aggregate([(s, SCALING) for s in states], "mean", weights=weights)
    assert report.included == [0, 1, 2, 3, 4] and not report.rejected
    assert report.exact and report.rank == 16  # stack rank 20 re-factored to the matrices' width 16
    got = deltas(state, report.scaling)
    for name in MODULES:
        want = sum(w / 150 * deltas(s, SCALING)[name][0] for s, w in zip(states, weights))
        want_m = sum(w / 150 * deltas(s, SCALING)[name][1] for s, w in zip(states, weights))
        assert torch.allclose(got[name][0], want, atol=1e-5, rtol=1e-5)
        assert torch.allclose(got[name][1], want_m, atol=1e-6)
    # Averaging A and B separately would NOT give this (the reason for stacking).
    name = next(iter(MODULES))
    naive = SCALING * (sum(parse_adapter(s, SCALING)[name].B for s in states) / 5) @ (
        sum(parse_adapter(s, SCALING)[name].A for s in states) / 5)
    assert not torch.allclose(naive, sum(deltas(s, SCALING)[name][0] for s in states) / 5, atol=1e-3)


def test_mean_handles_different_scalings_exactly():
    a, b = make_adapter(1), make_adapter(2)
    state, report = aggregate([(a, 2.0), (b, 0.5)], "mean")
    got = deltas(state, report.scaling)
    for name in MODULES:
        want = (deltas(a, 2.0)[name][0] + deltas(b, 0.5)[name][0]) / 2
        assert torch.allclose(got[name][0], want, atol=1e-5)


def test_compressing_to_a_rank_reports_the_truncation_error_and_is_exact_when_the_rank_suffices():
    states = [make_adapter(0)] * 3  # identical: the mean has rank 4
    state, report = aggregate([(s, SCALING) for s in states], "mean", rank=4)
    assert report.rank == 4 and report.exact and report.svd_error < 1e-6
    assert torch.allclose(deltas(state, report.scaling)[next(iter(MODULES))][0],
                          deltas(states[0], SCALING)[next(iter(MODULES))][0], atol=1e-4)
    different = [make_adapter(i, spread=0.5) for i in range(3)]
    _, lossy = aggregate([(s, SCALING) for s in different], "mean", rank=2)
    assert lossy.rank == 2 and not lossy.exact and 0 < lossy.svd_error < 1


@pytest.mark.parametrize("method", ["trimmed_mean", "median", "krum", "multi_krum"])
@pytest.mark.parametrize("kind", ["sign_flipped", "random"])
def test_robust_methods_stay_close_to_the_honest_mean_with_20_percent_poisoned(method, kind):
    honest = [make_adapter(i) for i in range(8)]
    poisoned = [poison(make_adapter(100 + i), kind, seed=i) for i in range(2)]
    target = honest_mean(honest)
    state, report = aggregate([(s, SCALING) for s in honest + poisoned], method, weights=[10] * 10)
    plain, _ = aggregate([(s, SCALING) for s in honest + poisoned], "mean", weights=[10] * 10, z_threshold=1e9)
    robust_err = distance_to(state, report.scaling, target)
    plain_err = distance_to(plain, report.scaling, target)
    worst_honest = max(distance_to(s, SCALING, target) for s in honest)
    # Krum picks one honest miner (so its error is one miner's noise); all must beat the plain
    # mean and be no further from the honest mean than the furthest honest miner.
    assert robust_err < plain_err and robust_err <= worst_honest, (robust_err, plain_err, worst_honest)
    if method in ("trimmed_mean", "median", "multi_krum"):
        assert robust_err < 0.5 * plain_err, (robust_err, plain_err)
    if method in ("krum", "multi_krum"):
        assert 8 not in report.included and 9 not in report.included


def test_scaled_update_is_rejected_by_the_norm_filter_with_a_reason():
    states = [make_adapter(i) for i in range(4)] + [poison(make_adapter(9), "scaled")]
    state, report = aggregate([(s, SCALING) for s in states], "mean")
    assert 4 in report.rejected and "update norm" in report.rejected[4] and "far above" in report.rejected[4]
    assert report.included == [0, 1, 2, 3]


def test_norms_are_measured_from_the_base_adapter_when_given():
    states = [make_adapter(i) for i in range(1, 5)]
    _, report = aggregate([(s, SCALING) for s in states], "median", base=(states[2], SCALING))
    assert report.norms[2] == 0
    expected = distance_to(states[0], SCALING, deltas(states[2], SCALING))
    assert report.norms[0] >= expected  # delta distance plus the magnitudes' distance


def test_nan_wrong_shape_wrong_dtype_bad_keys_are_rejected_with_reasons():
    good = [make_adapter(i) for i in range(3)]
    nan = make_adapter(10)
    nan["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"][0, 0] = float("nan")
    inf = make_adapter(11)
    inf["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"][3] = float("inf")
    shape = make_adapter(12, modules={"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.0.mlp.down_proj": (16, 41)})
    dtype = make_adapter(13)
    dtype["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.ones(4, 16, dtype=torch.int64)
    keys = dict(make_adapter(14), **{"base_model.model.lm_head.weight": torch.zeros(3)})
    chain = make_adapter(15)
    chain["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(24, 3)
    missing = {k: v for k, v in make_adapter(16).items() if "down_proj" not in k}
    adapters = [(s, SCALING) for s in good + [nan, inf, shape, dtype, keys, chain, missing]] + [(make_adapter(17), -1)]
    _, report = aggregate(adapters, "mean")
    assert report.included == [0, 1, 2]
    reasons = report.rejected
    assert "NaN or Inf" in reasons[3] and "NaN or Inf" in reasons[4]
    assert "wrong shape" in reasons[5] and "16x41" in reasons[5]
    assert "dtype int64" in reasons[6]
    assert "not a PEFT LoRA/DoRA key" in reasons[7]
    assert "do not chain" in reasons[8]
    assert "missing" in reasons[9]
    assert "scaling" in reasons[10]


def test_nothing_usable_raises_with_every_reason():
    bad = make_adapter(1)
    bad["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"][:] = float("nan")
    with pytest.raises(ValueError, match="no submission can be aggregated: #0: .*NaN"):
        aggregate([(bad, SCALING)], "mean")
    with pytest.raises(ValueError, match="unknown aggregation method"):
        aggregate([(make_adapter(1), SCALING)], "average")


def test_krum_selects_the_submission_closest_to_its_neighbours():
    honest = [make_adapter(i) for i in range(6)]
    attackers = [poison(make_adapter(50 + i), "random", seed=i) for i in range(2)]
    _, report = aggregate([(s, SCALING) for s in honest + attackers], "krum", z_threshold=1e9)
    assert len(report.included) == 1 and report.included[0] < 6
    chosen = report.included[0]
    assert report.scores[chosen] == min(report.scores.values())
    assert all("not selected by Krum" in report.rejected[i] for i in range(8) if i != chosen)


def test_multi_krum_keeps_n_minus_f_and_averages_them_exactly():
    honest = [make_adapter(i) for i in range(7)]
    attacker = poison(make_adapter(70), "random")
    states = honest + [attacker]
    state, report = aggregate([(s, SCALING) for s in states], "multi_krum", f=1, z_threshold=1e9)
    assert len(report.included) == 7 and 7 not in report.included
    got = deltas(state, report.scaling)
    name = next(iter(MODULES))
    want = sum(deltas(states[i], SCALING)[name][0] for i in report.included) / 7
    assert torch.allclose(got[name][0], want, atol=1e-5)


def test_trimmed_mean_drops_beta_of_each_end_per_coordinate():
    states = [make_adapter(0, spread=0)] * 10
    extreme = poison(make_adapter(0, spread=0), "scaled")
    state, report = aggregate([(s, SCALING) for s in states[:9] + [extreme]], "trimmed_mean", z_threshold=1e9)
    name = next(iter(MODULES))
    assert torch.allclose(deltas(state, report.scaling)[name][0], deltas(states[0], SCALING)[name][0], atol=1e-4)


def test_median_of_identical_low_rank_updates_is_recovered_exactly():
    states = [make_adapter(3, spread=0)] * 4
    state, report = aggregate([(s, SCALING) for s in states], "median")
    assert report.svd_error < 1e-6 and report.exact
    name = next(iter(MODULES))
    assert torch.allclose(deltas(state, report.scaling)[name][0], deltas(states[0], SCALING)[name][0], atol=1e-4)


def test_many_stacked_submissions_are_refactored_exactly_to_the_matrix_width():
    small = {"model.layers.0.self_attn.q_proj": (12, 10)}
    states = [make_adapter(i, rank=4, modules=small) for i in range(5)]  # stack rank 20 > width 10
    state, report = aggregate([(s, SCALING) for s in states], "mean")
    assert report.rank == 10 and report.exact
    name = next(iter(small))
    want = sum(deltas(s, SCALING)[name][0] for s in states) / 5
    assert torch.allclose(deltas(state, report.scaling)[name][0], want, atol=1e-5)
