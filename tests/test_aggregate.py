"""ΔW aggregation (FedPipe eqs 9-10) against hand-computed references."""

import numpy as np
import pytest
import torch
from fakes import client_delta, factors, fedavg_factors

from fedpipe_core.aggregate import (
    ClientUpdate,
    aggregate_delta,
    aggregate_lowrank,
    aggregate_padded,
    truncate_with_feedback,
)
from fedpipe_core.codec import (
    UpdateError,
    decode_delta,
    decode_factors,
    encode_delta,
    encode_factors,
)
from fedpipe_core.lowrank import LowRank, concat, factor_svd

SHAPES = {"q": (6, 5), "v": (4, 5)}


def test_mixed_ranks_and_missing_modules_match_hand_computation():
    # client 1: rank 2 on q and v, 10 examples; client 2: rank 4 on q only, 30 examples;
    # client 3: rank 1 on v only, 20 examples.
    s1, s2, s3 = 8 / 2, 8 / 4, 8 / 1
    q1, v1, q2, v3 = factors(2, 6, 5, 1, s1), factors(2, 4, 5, 2, s1), factors(4, 6, 5, 3, s2), factors(1, 4, 5, 4, s3)
    updates = [ClientUpdate({"q": q1, "v": v1}, 10), ClientUpdate({"q": q2}, 30), ClientUpdate({"v": v3}, 20)]
    expected_q = (10 / 40) * s1 * (q1.B @ q1.A) + (30 / 40) * s2 * (q2.B @ q2.A)
    expected_v = (10 / 30) * s1 * (v1.B @ v1.A) + (20 / 30) * s3 * (v3.B @ v3.A)
    got = aggregate_delta(updates)
    assert set(got) == {"q", "v"}
    torch.testing.assert_close(got["q"], expected_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["v"], expected_v, rtol=1e-5, atol=1e-5)
    lowrank = aggregate_lowrank(updates)
    assert lowrank["q"].A.shape == (6, 5) and lowrank["q"].B.shape == (6, 6) and lowrank["q"].scale == 1.0  # rank 2 + 4
    assert lowrank["v"].rank == 3  # rank 2 + 1


def test_a_factor_pair_carries_its_scale_into_its_product_and_norm():
    lowrank = factors(3, 4, 5, 7, scale=0.5)
    torch.testing.assert_close(lowrank.dense(), client_delta(lowrank.A, lowrank.B, 0.5))
    torch.testing.assert_close(lowrank.folded().dense(), lowrank.dense())
    assert lowrank.folded().scale == 1.0 and torch.equal(lowrank.folded().B, 0.5 * lowrank.B)
    negative = LowRank(lowrank.A, lowrank.B, -0.5)
    assert negative.norm() == pytest.approx(float(torch.linalg.matrix_norm(0.5 * lowrank.B @ lowrank.A)), rel=1e-6)
    U, S, V = factor_svd(lowrank)
    torch.testing.assert_close(S, torch.linalg.svdvals(lowrank.dense().double())[:3], rtol=1e-6, atol=1e-8)
    assert lowrank.padded(5).scale == 0.5 and lowrank.truncated(2).scale == 0.5
    torch.testing.assert_close(lowrank.padded(5).dense(), lowrank.dense())


def test_concat_keeps_a_shared_scale_and_folds_different_ones():
    a, b = factors(2, 4, 5, 1, scale=2.0), factors(1, 4, 5, 2, scale=2.0)
    same = concat([a, b])
    assert same.scale == 2.0 and same.rank == 3
    torch.testing.assert_close(same.dense(), a.dense() + b.dense())
    mixed = concat([a, factors(1, 4, 5, 2, scale=0.5)])
    assert mixed.scale == 1.0
    torch.testing.assert_close(mixed.dense(), a.dense() + factors(1, 4, 5, 2, scale=0.5).dense(), rtol=1e-5, atol=1e-5)


def test_lora_fedavg_averages_factors_separately_and_refuses_mixed_ranks_and_scales():
    f1, f2 = factors(2, 4, 5, 1), factors(2, 4, 5, 2)
    out = fedavg_factors([ClientUpdate({"v": f1}, 1), ClientUpdate({"v": f2}, 3)])
    torch.testing.assert_close(out["v"].A, 0.25 * f1.A + 0.75 * f2.A)
    torch.testing.assert_close(out["v"].B, 0.25 * f1.B + 0.75 * f2.B)
    with pytest.raises(ValueError, match="one rank per module"):
        fedavg_factors([ClientUpdate({"v": f1}, 1), ClientUpdate({"v": factors(3, 4, 5, 3)}, 1)])
    with pytest.raises(ValueError, match="different scales"):
        aggregate_padded([ClientUpdate({"v": f1}, 1), ClientUpdate({"v": factors(2, 4, 5, 2, scale=2.0)}, 1)], {"v": 2})


def test_encoding_picks_the_smaller_exact_form():
    small = factors(1, 6, 5, 1, scale=3.0)
    large = concat([factors(2, 6, 5, s) for s in range(3)])  # rank 6: 6*(6+5) > 6*5
    assert not small.is_cheaper_dense() and large.is_cheaper_dense()
    payload = encode_delta({"q": small, "v": factors(1, 4, 5, 2)})
    assert set(payload) == {"q::A", "q::B", "v::A", "v::B"}
    dense_payload = encode_delta({"q": large})
    assert set(dense_payload) == {"q::dW"}
    torch.testing.assert_close(decode_delta(dense_payload, SHAPES)["q"], large.dense())
    torch.testing.assert_close(decode_delta(payload, SHAPES)["q"], small.dense())  # the scale travels folded into B
    decoded = decode_factors(encode_factors({"q": small}), SHAPES, scale=3.0)["q"]  # adapters: the scale is the config's
    assert decoded.scale == 3.0 and torch.equal(decoded.B, small.B)


def good_payload():
    return encode_factors({"q": factors(2, 6, 5, 1)})


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda p: p.update({"q::A": p["q::A"][:, :3]}), "do not factor"),
        (lambda p: p.update({"q::B": p["q::B"][:, :1]}), "do not factor"),
        (lambda p: p.pop("q::B"), "expected both"),
        (lambda p: p.update({"k::A": p["q::A"]}), "not an adaptable module"),
        (lambda p: p.update({"q::A": p["q::A"].astype(np.int64)}), "not floating point"),
        (lambda p: p["q::A"].__setitem__((0, 0), np.nan), "NaN or Inf"),
        (lambda p: p["q::B"].__setitem__((0, 0), np.inf), "NaN or Inf"),
        (lambda p: p.update({"q::A": p["q::A"][0]}), "expected a matrix"),
        (lambda p: p.update({"q-A": p["q::A"]}), "expected '<module>::A|B|dW'"),
    ],
)
def test_malformed_factors_are_rejected_with_a_reason(mutate, fragment):
    payload = good_payload()
    mutate(payload)
    with pytest.raises(UpdateError, match=fragment):
        decode_factors(payload, SHAPES, scale=1.0)


def test_factor_svd_matches_the_dense_decomposition():
    g = torch.Generator().manual_seed(4)
    lowrank = LowRank(torch.randn(6, 40, generator=g), torch.randn(30, 6, generator=g))
    U, S, V = factor_svd(lowrank)
    dense = lowrank.dense().double()
    torch.testing.assert_close(S, torch.linalg.svdvals(dense)[:6], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close((U * S) @ V.T, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(U.T @ U, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-10)


def test_truncate_with_feedback_delays_and_never_drops_what_clients_learned():
    g = torch.Generator().manual_seed(3)
    rounds = [
        {
            "m": LowRank(torch.randn(12, 40, generator=g), torch.randn(30, 12, generator=g)),
            "small": LowRank(torch.randn(2, 10, generator=g), torch.randn(5, 2, generator=g)),
        }
        for _ in range(3)
    ]
    residual: dict[str, LowRank] = {}
    sent_total = torch.zeros(30, 40, dtype=torch.float64)
    for increment in rounds:
        before = residual["m"].dense() if "m" in residual else torch.zeros(30, 40)
        sent, residual = truncate_with_feedback(increment, residual, 4)
        assert sent["m"].A.shape == (4, 40) and sent["m"].B.shape == (30, 4)
        assert sent["small"] is increment["small"] and "small" not in residual  # rank 2 <= 4: sent exactly
        target = (before + increment["m"].dense()).double()
        tail = torch.linalg.svdvals(target)[4:]
        assert float(residual["m"].dense().norm()) == pytest.approx(float(tail.norm()), rel=1e-4)  # Eckart-Young
        assert residual["m"].rank <= 30  # factored, at most min(out, in)
        sent_total += sent["m"].dense().double()
    exact = sum(r["m"].dense().double() for r in rounds)
    torch.testing.assert_close(sent_total + residual["m"].dense().double(), exact, rtol=1e-4, atol=1e-4)
    flushed, residual = truncate_with_feedback({}, residual, 4)  # nobody trained "m": its remainder still goes out
    assert set(flushed) == {"m"} and flushed["m"].rank == 4
    zero = {"z": LowRank(torch.zeros(9, 40), torch.zeros(30, 9))}
    assert truncate_with_feedback(zero, {}, 4) == ({}, {})  # nothing to send, nothing to keep
