"""ΔW aggregation (FedPipe eqs 9-10) against hand-computed references."""

import numpy as np
import pytest
import torch
from fakes import client_delta, factors, fedavg_factors

from fedpipe_core.aggregate import (
    ClientUpdate,
    aggregate_delta,
    aggregate_lowrank,
    concat_lowrank,
    is_cheaper_dense,
    lowrank_norm,
    lowrank_svd,
    to_dense,
    truncate_with_feedback,
)
from fedpipe_core.codec import (
    UpdateError,
    decode_delta,
    decode_factors,
    encode_delta,
    encode_factors,
)

SHAPES = {"q": (6, 5), "v": (4, 5)}


def test_mixed_ranks_and_missing_modules_match_hand_computation():
    # client 1: rank 2 on q and v, 10 examples; client 2: rank 4 on q only, 30 examples;
    # client 3: rank 1 on v only, 20 examples.
    a1q, b1q = factors(2, 6, 5, 1)
    a1v, b1v = factors(2, 4, 5, 2)
    a2q, b2q = factors(4, 6, 5, 3)
    a3v, b3v = factors(1, 4, 5, 4)
    s1, s2, s3 = 8 / 2, 8 / 4, 8 / 1
    updates = [
        ClientUpdate({"q": (a1q, b1q), "v": (a1v, b1v)}, {"q": s1, "v": s1}, 10),
        ClientUpdate({"q": (a2q, b2q)}, {"q": s2}, 30),
        ClientUpdate({"v": (a3v, b3v)}, {"v": s3}, 20),
    ]
    expected_q = (10 / 40) * s1 * (b1q @ a1q) + (30 / 40) * s2 * (b2q @ a2q)
    expected_v = (10 / 30) * s1 * (b1v @ a1v) + (20 / 30) * s3 * (b3v @ a3v)
    got = aggregate_delta(updates)
    assert set(got) == {"q", "v"}
    torch.testing.assert_close(got["q"], expected_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["v"], expected_v, rtol=1e-5, atol=1e-5)
    lowrank = aggregate_lowrank(updates)
    assert lowrank["q"][0].shape == (6, 5) and lowrank["q"][1].shape == (6, 6)  # rank 2 + 4
    assert lowrank["v"][0].shape == (3, 5)  # rank 2 + 1


def test_client_delta_is_scaled_product_and_its_norm_needs_no_product():
    a, b = factors(3, 4, 5, 7)
    torch.testing.assert_close(client_delta(a, b, 0.5), 0.5 * b @ a)
    assert lowrank_norm(a, b, -0.5) == pytest.approx(float(torch.linalg.matrix_norm(0.5 * b @ a)), rel=1e-6)


def test_lora_fedavg_averages_factors_separately_and_refuses_mixed_ranks():
    a1, b1 = factors(2, 4, 5, 1)
    a2, b2 = factors(2, 4, 5, 2)
    out = fedavg_factors([ClientUpdate({"v": (a1, b1)}, {"v": 1.0}, 1), ClientUpdate({"v": (a2, b2)}, {"v": 1.0}, 3)])
    torch.testing.assert_close(out["v"][0], 0.25 * a1 + 0.75 * a2)
    torch.testing.assert_close(out["v"][1], 0.25 * b1 + 0.75 * b2)
    a3, b3 = factors(3, 4, 5, 3)
    with pytest.raises(ValueError, match="one rank per module"):
        fedavg_factors([ClientUpdate({"v": (a1, b1)}, {"v": 1.0}, 1), ClientUpdate({"v": (a3, b3)}, {"v": 1.0}, 1)])


def test_encoding_picks_the_smaller_exact_form():
    small = factors(1, 6, 5, 1)
    large = concat_lowrank([factors(2, 6, 5, s) for s in range(3)])  # rank 6: 6*(6+5) > 6*5
    assert not is_cheaper_dense(small) and is_cheaper_dense(large)
    payload = encode_delta({"q": small, "v": factors(1, 4, 5, 2)})
    assert set(payload) == {"q::A", "q::B", "v::A", "v::B"}
    dense_payload = encode_delta({"q": large})
    assert set(dense_payload) == {"q::dW"}
    torch.testing.assert_close(decode_delta(dense_payload, SHAPES)["q"], to_dense(large))
    torch.testing.assert_close(decode_delta(payload, SHAPES)["q"], to_dense(small))


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
        decode_factors(payload, SHAPES)


def test_lowrank_svd_matches_the_dense_decomposition():
    g = torch.Generator().manual_seed(4)
    A, B = torch.randn(6, 40, generator=g), torch.randn(30, 6, generator=g)
    U, S, V = lowrank_svd((A, B))
    dense = to_dense((A, B)).double()
    torch.testing.assert_close(S, torch.linalg.svdvals(dense)[:6], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close((U * S) @ V.T, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(U.T @ U, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-10)


def test_truncate_with_feedback_delays_and_never_drops_what_clients_learned():
    g = torch.Generator().manual_seed(3)
    rounds = [
        {
            "m": (torch.randn(12, 40, generator=g), torch.randn(30, 12, generator=g)),
            "small": (torch.randn(2, 10, generator=g), torch.randn(5, 2, generator=g)),
        }
        for _ in range(3)
    ]
    residual: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    sent_total = torch.zeros(30, 40, dtype=torch.float64)
    for increment in rounds:
        before = to_dense(residual["m"]) if "m" in residual else torch.zeros(30, 40)
        sent, residual = truncate_with_feedback(increment, residual, 4)
        assert sent["m"][0].shape == (4, 40) and sent["m"][1].shape == (30, 4)
        assert sent["small"] is increment["small"] and "small" not in residual  # rank 2 <= 4: sent exactly
        target = (before + to_dense(increment["m"])).double()
        tail = torch.linalg.svdvals(target)[4:]
        assert float(to_dense(residual["m"]).norm()) == pytest.approx(float(tail.norm()), rel=1e-4)  # Eckart-Young
        assert residual["m"][0].shape[0] <= 30  # factored, at most min(out, in)
        sent_total += to_dense(sent["m"]).double()
    exact = sum(to_dense(r["m"]).double() for r in rounds)
    torch.testing.assert_close(sent_total + to_dense(residual["m"]).double(), exact, rtol=1e-4, atol=1e-4)
    flushed, residual = truncate_with_feedback({}, residual, 4)  # nobody trained "m": its remainder still goes out
    assert set(flushed) == {"m"} and flushed["m"][0].shape[0] == 4
    zero = {"z": (torch.zeros(9, 40), torch.zeros(30, 9))}
    assert truncate_with_feedback(zero, {}, 4) == ({}, {})  # nothing to send, nothing to keep
