"""Secure aggregation's core: masks cancel exactly, a site lost after masking is recovered from t shares."""

import numpy as np
import pytest

from fedpipe_core.secagg import (
    FixedPoint,
    SecAggError,
    masked,
    new_private_key,
    new_self_seed,
    public_key,
    rebuild,
    split,
    unmask,
)

CONTEXT = b"run 7 round 3"


def _sites(n: int, shape=(3, 5), seed: int = 0):
    rng = np.random.default_rng(seed)
    vectors = {k: rng.uniform(-2, 2, size=shape) for k in range(1, n + 1)}
    privates = {k: new_private_key() for k in vectors}
    seeds = {k: new_self_seed() for k in vectors}
    publics = {k: public_key(p) for k, p in privates.items()}
    return vectors, privates, seeds, publics


def test_the_server_recovers_the_exact_sum_and_no_single_upload_shows_its_vector():
    code = FixedPoint(bound=4.0, frac_bits=32)
    vectors, privates, seeds, publics = _sites(4)
    code.check_capacity(len(vectors))
    uploads = {k: masked(code.encode(v), k, privates[k], seeds[k], publics, CONTEXT) for k, v in vectors.items()}
    total = sum(uploads.values(), np.zeros((3, 5), dtype=np.uint64))
    words = unmask(total, sorted(uploads), seeds, {}, publics, CONTEXT)
    assert np.array_equal(words, sum((code.encode(v) for v in vectors.values()), np.zeros((3, 5), dtype=np.uint64)))
    np.testing.assert_allclose(code.decode(words), sum(vectors.values()), atol=4 * 2.0**-32)
    for k, upload in uploads.items():  # a masked upload is uniform noise: its decoding is nowhere near the vector
        assert np.abs(code.decode(upload) - vectors[k]).min() > 1e3


def test_a_site_lost_after_masking_is_unmasked_from_threshold_shares_of_its_key():
    code = FixedPoint()
    vectors, privates, seeds, publics = _sites(5, seed=1)
    threshold = 3
    key_shares = {k: split(privates[k], threshold, 5) for k in vectors}  # share i goes to site i + 1
    seed_shares = {k: split(seeds[k], threshold, 5) for k in vectors}
    uploads = {k: masked(code.encode(v), k, privates[k], seeds[k], publics, CONTEXT) for k, v in vectors.items()}
    del uploads[2]  # site 2 masked its vector with everyone's keys, and its upload never arrived
    sent = sorted(uploads)
    helpers = sent[:threshold]  # the survivors reveal, per site, the self-seed share (it sent) or the key share (lost)
    seeds_back = {k: rebuild([seed_shares[k][h - 1] for h in helpers], threshold) for k in sent}
    lost_back = {2: rebuild([key_shares[2][h - 1] for h in helpers], threshold)}
    assert lost_back[2] == privates[2] and all(seeds_back[k] == seeds[k] for k in sent)
    total = sum(uploads.values(), np.zeros((3, 5), dtype=np.uint64))
    words = unmask(total, sent, seeds_back, lost_back, publics, CONTEXT)
    np.testing.assert_allclose(code.decode(words), sum(vectors[k] for k in sent), atol=5 * 2.0**-32)
    wrong = unmask(total, sent, seeds_back, lost_back, publics, b"another round")
    assert not np.allclose(code.decode(wrong), sum(vectors[k] for k in sent), atol=1.0)  # pair masks are bound to a round
    with pytest.raises(SecAggError, match="2 share\\(s\\) cannot rebuild"):
        rebuild([key_shares[2][0], key_shares[2][1]], threshold)
    assert rebuild([key_shares[2][0], key_shares[2][1]], 2) != privates[2]  # two shares of a 3-of-5 split: not the key
    assert rebuild([key_shares[2][4], key_shares[2][1], key_shares[2][3]], 3) == privates[2]  # any three, any order


def test_out_of_range_values_and_sums_that_could_wrap_are_refused():
    code = FixedPoint(bound=1.0, frac_bits=40)
    with pytest.raises(SecAggError, match="magnitude 1.5 is outside the range ±1"):
        code.encode(np.array([0.5, -1.5]))
    with pytest.raises(SecAggError, match="outside the range"):
        code.encode(np.array([np.nan]))
    code.check_capacity(8_000_000)  # 8e6 · 2^40 < 2^63
    with pytest.raises(SecAggError, match="can overflow 64 bits"):
        code.check_capacity(9_000_000)
    with pytest.raises(SecAggError, match="threshold 1"):
        split(b"k" * 32, 1, 3)
    np.testing.assert_allclose(code.decode(code.encode(np.array([-1.0, 0.25, 1.0]))), [-1.0, 0.25, 1.0])
