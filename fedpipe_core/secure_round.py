"""One round of secure aggregation (``privacy.mode = "secure"``): the stages around :mod:`fedpipe_core.secagg`.

The round of Bonawitz et al. (CCS 2017, semi-honest, with dropouts), four exchanges relayed by the server:

1. **keys**: each site draws two X25519 key pairs for the round, c (to encrypt shares) and s (its pair masks), and
   a self-mask seed b; it sends the two public keys (:func:`advertise`).
2. **shares**: each site gets the roster of public keys, splits s_sk and b into t-of-n Shamir shares and sends each
   other site its two shares encrypted to it (ChaCha20-Poly1305 under HKDF(X25519(c_sk, c_pk_j)); :func:`deal`).
3. **masked upload**: with its TRAIN reply, a site sends its vector masked by b and by ± its pair masks with every
   site of the roster (:func:`mask`); the shares addressed to it travel with its TRAIN message.
4. **unmask**: the server names the sites whose upload arrived; each survivor opens the shares it holds and reveals,
   per site, the share of b (it sent) or of s_sk (it did not), never both (:func:`reveal`); from t of them the
   server removes the masks (:meth:`ServerRound.unmask`).

A site's vector (:class:`Layout`) is n_k·B_k per module (zero where it trained none), then per module n_k where it
trained it, then n_k, n_k·(train loss), and the examples and summed loss of its evaluation: the server learns these
sums over the sites and nothing per site. Nothing here imports Flower; the messages are in
:mod:`fedpipe_flower.secure`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedpipe_core.secagg import (
    WORD,
    FixedPoint,
    SecAggError,
    masked,
    new_private_key,
    new_self_seed,
    pair_key,
    public_key,
    rebuild,
    split,
    unmask,
)

TAIL = ("examples", "loss-sum", "eval-examples", "eval-loss-sum")
"""The sums after the per-module weights: Σ n_k, Σ n_k·loss_k, Σ eval examples, Σ eval examples · eval loss."""


def majority(sites: int) -> int:
    """The default threshold t: more than half of the round's sites (at least 2), so a minority cannot unmask."""
    return max(2, sites // 2 + 1)


def fixed_point(value_range: float, sites: int) -> FixedPoint:
    """The encoding of a round: values in ±``value_range``, with as many fractional bits as ``sites`` summed words
    leave in 64 bits (one bit spare); refused when fewer than 16 remain."""
    bits = 62 - math.ceil(math.log2(max(2, sites) * value_range))
    if bits < 16:
        raise SecAggError(f"secure aggregation: range ±{value_range:g} over {sites} sites leaves {bits} fractional bits")
    code = FixedPoint(bound=value_range, frac_bits=bits)
    code.check_capacity(sites)
    return code


@dataclass(frozen=True)
class Layout:
    """Where each sum lies in a site's vector: the modules of the round (sorted), each B of shape (out, rank)."""

    modules: tuple[tuple[str, int], ...]
    """(module, out features) of every module some site trains this round."""
    rank: int

    @property
    def size(self) -> int:
        return sum(out * self.rank for _, out in self.modules) + len(self.modules) + len(TAIL)

    def flatten(
        self, b: Mapping[str, np.ndarray], examples: int, loss: float, evaluation: tuple[float, int] | None
    ) -> np.ndarray:
        """A site's vector: n·B per module (zero where it trained none), n per trained module, then :data:`TAIL`."""
        unknown = sorted(set(b) - {m for m, _ in self.modules})
        if unknown:
            raise SecAggError(f"secure aggregation: modules outside the round's layout: {unknown[:3]}")
        parts = []
        for module, out in self.modules:
            value = b.get(module)
            if value is not None and value.shape != (out, self.rank):
                raise SecAggError(f"secure aggregation: {module}::B has shape {value.shape}, the layout {(out, self.rank)}")
            parts.append(np.zeros(out * self.rank) if value is None else examples * np.asarray(value, np.float64).ravel())
        parts.append(np.array([examples if m in b else 0 for m, _ in self.modules], dtype=np.float64))
        eval_loss, eval_examples = evaluation if evaluation else (0.0, 0)
        parts.append(np.array([examples, examples * loss, eval_examples, eval_examples * eval_loss], dtype=np.float64))
        return np.concatenate(parts)

    def unflatten(self, total: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, float]]:
        """From the summed vector: Σ n_k B_k per module trained by some site, Σ n_k per such module, the tail's sums."""
        if total.shape != (self.size,):
            raise SecAggError(f"secure aggregation: a sum of {total.shape} values, the layout has {self.size}")
        sums, at = {}, 0
        for module, out in self.modules:
            sums[module] = total[at : at + out * self.rank].reshape(out, self.rank)
            at += out * self.rank
        weights = {m: float(w) for (m, _), w in zip(self.modules, total[at : at + len(self.modules)], strict=True)}
        tail = dict(zip(TAIL, (float(v) for v in total[at + len(self.modules) :]), strict=True))
        trained = {m for m, w in weights.items() if w > 0.5}  # weights are whole examples: 0 or ≥ 1
        return {m: s for m, s in sums.items() if m in trained}, {m: w for m, w in weights.items() if m in trained}, tail


# --- a site's side ----------------------------------------------------------------------------------------------
@dataclass
class SiteSecrets:
    """What a site keeps between the stages of one round (in its Flower context's state; never sent)."""

    server_round: int
    nonce: bytes
    c_private: bytes
    s_private: bytes
    self_seed: bytes
    roster: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    """(c_pk, s_pk) of every site of the round, this one included, once the shares stage named them."""
    threshold: int = 0
    own_shares: tuple[bytes, bytes] = (b"", b"")
    """This site's own share of its s_sk and of its b (it helps unmask itself like any other site)."""
    received: dict[int, bytes] = field(default_factory=dict)
    """The encrypted shares every other site dealt to this one."""
    masked: bool = False
    revealed: bool = False


def advertise(server_round: int, nonce: bytes) -> tuple[SiteSecrets, bytes, bytes]:
    """Stage 1: fresh secrets for the round and the two public keys (c_pk, s_pk) to send."""
    secrets = SiteSecrets(server_round, nonce, new_private_key(), new_private_key(), new_self_seed())
    return secrets, public_key(secrets.c_private), public_key(secrets.s_private)


def _share_key(private: bytes, peer_public: bytes, nonce: bytes) -> bytes:
    return pair_key(private, peer_public, nonce, purpose=b"share encryption")


def _associated(nonce: bytes, sender: int, receiver: int) -> bytes:
    return nonce + sender.to_bytes(8, "big", signed=False) + receiver.to_bytes(8, "big", signed=False)


def check_roster(roster: Mapping[int, tuple[bytes, bytes]], me: int, threshold: int) -> None:
    """A usable roster: this site in it, 32-byte keys, no key twice, 2 ≤ t ≤ n."""
    if me not in roster:
        raise SecAggError(f"secure aggregation: site {me} is not in the round's roster")
    keys = [k for pair in roster.values() for k in pair]
    if any(len(k) != 32 for k in keys) or len(set(keys)) != len(keys):
        raise SecAggError("secure aggregation: the roster's public keys are malformed or repeated")
    if not 2 <= threshold <= len(roster):
        raise SecAggError(f"secure aggregation: threshold {threshold} for {len(roster)} sites")


def deal(secrets: SiteSecrets, me: int, roster: Mapping[int, tuple[bytes, bytes]], threshold: int) -> dict[int, bytes]:
    """Stage 2: the shares of s_sk and b, one pair per site of the roster (share index = rank in the sorted roster),
    each other site's encrypted to it; this site's own pair is kept in ``secrets``."""
    if secrets.roster:
        raise SecAggError(f"secure aggregation: site {me} already dealt its shares this round")
    check_roster(roster, me, threshold)
    sites = sorted(roster)
    if roster[me] != (public_key(secrets.c_private), public_key(secrets.s_private)):
        raise SecAggError(f"secure aggregation: the roster's keys for site {me} are not the ones it advertised")
    s_shares, b_shares = (split(x, threshold, len(sites)) for x in (secrets.s_private, secrets.self_seed))
    secrets.roster, secrets.threshold = dict(roster), threshold
    out = {}
    for index, site in enumerate(sites):
        pair = s_shares[index] + b_shares[index]
        if site == me:
            secrets.own_shares = (s_shares[index], b_shares[index])
            continue
        nonce = os.urandom(12)
        key = _share_key(secrets.c_private, roster[site][0], secrets.nonce)
        out[site] = nonce + ChaCha20Poly1305(key).encrypt(nonce, pair, _associated(secrets.nonce, me, site))
    return out


def mask(secrets: SiteSecrets, me: int, vector: np.ndarray, code: FixedPoint, received: Mapping[int, bytes]) -> np.ndarray:
    """Stage 3: this site's vector encoded, masked by its self seed and ± its pair mask with every roster site.
    ``received``: the shares dealt to it (kept for stage 4); every other roster site must have dealt one."""
    if secrets.masked:
        raise SecAggError(f"secure aggregation: site {me} already sent its masked vector this round")
    missing = sorted(set(secrets.roster) - {me} - set(received))
    if missing or set(received) - set(secrets.roster):
        raise SecAggError(f"secure aggregation: shares are missing from sites {missing[:3]} or come from outside the roster")
    secrets.received, secrets.masked = dict(received), True
    publics = {site: pair[1] for site, pair in secrets.roster.items()}
    return masked(code.encode(vector), me, secrets.s_private, secrets.self_seed, publics, secrets.nonce)


def reveal(secrets: SiteSecrets, me: int, survivors: list[int], lost: list[int]) -> dict[str, dict[int, bytes]]:
    """Stage 4: for each survivor the share of its self seed, for each lost site the share of its s_sk. Refused
    when the server names a site in both lists, a site outside the roster, fewer survivors than t, or asks twice."""
    survivors_set, lost_set = set(survivors), set(lost)
    if secrets.revealed:
        raise SecAggError(f"secure aggregation: site {me} already revealed its shares this round")
    if survivors_set & lost_set or (survivors_set | lost_set) != set(secrets.roster) or me not in survivors_set:
        raise SecAggError("secure aggregation: survivors and lost sites must split the roster, this site a survivor")
    if len(survivors_set) < secrets.threshold:
        raise SecAggError(f"secure aggregation: {len(survivors_set)} survivors, fewer than the threshold {secrets.threshold}")
    secrets.revealed = True
    opened = {me: secrets.own_shares}
    for site, blob in secrets.received.items():
        key = _share_key(secrets.c_private, secrets.roster[site][0], secrets.nonce)
        try:
            pair = ChaCha20Poly1305(key).decrypt(blob[:12], blob[12:], _associated(secrets.nonce, site, me))
        except InvalidTag:
            raise SecAggError(f"secure aggregation: the shares from site {site} do not authenticate") from None
        half = len(pair) // 2
        opened[site] = (pair[:half], pair[half:])
    return {
        "seed": {site: opened[site][1] for site in sorted(survivors_set) if site in opened},
        "key": {site: opened[site][0] for site in sorted(lost_set) if site in opened},
    }


# --- the server's side ------------------------------------------------------------------------------------------
@dataclass
class ServerRound:
    """The server's view of one round: the roster, the uploads, and the reveals it unmasks their sum with."""

    server_round: int
    nonce: bytes
    threshold: int
    roster: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    dealt: dict[int, dict[int, bytes]] = field(default_factory=dict)
    """Per receiving site: the encrypted shares every dealer addressed to it."""
    uploads: dict[int, np.ndarray] = field(default_factory=dict)

    @classmethod
    def start(cls, server_round: int, threshold: int) -> ServerRound:
        return cls(server_round, os.urandom(16), threshold)

    def admit_keys(self, site: int, c_public: bytes, s_public: bytes) -> None:
        if len(c_public) != 32 or len(s_public) != 32:
            raise SecAggError(f"secure aggregation: site {site} sent malformed public keys")
        self.roster[site] = (c_public, s_public)

    def admit_shares(self, dealer: int, shares: Mapping[int, bytes]) -> None:
        """A dealer's encrypted shares, one for every other roster site (else the dealer is left out)."""
        if set(shares) != set(self.roster) - {dealer}:
            raise SecAggError(f"secure aggregation: site {dealer} dealt shares to {sorted(shares)[:4]}, not to the roster")
        for receiver, blob in shares.items():
            self.dealt.setdefault(receiver, {})[dealer] = blob

    def narrow(self, sites: list[int]) -> None:
        """Keep only ``sites`` (those that dealt): the roster the masks are made with."""
        self.roster = {s: self.roster[s] for s in sorted(sites)}
        self.dealt = {r: {d: b for d, b in got.items() if d in self.roster} for r, got in self.dealt.items() if r in self.roster}
        if len(self.roster) < self.threshold:
            raise SecAggError(
                f"secure aggregation: {len(self.roster)} sites dealt shares, fewer than the threshold {self.threshold}"
            )

    def admit_upload(self, site: int, words: np.ndarray, size: int) -> None:
        if site not in self.roster or words.dtype != WORD or words.shape != (size,):
            raise SecAggError(f"secure aggregation: site {site}'s upload is not {size} words of a roster site")
        self.uploads[site] = words

    def survivors(self) -> tuple[list[int], list[int]]:
        """(sites whose masked upload arrived, roster sites lost after the shares stage)."""
        sent = sorted(self.uploads)
        return sent, [s for s in self.roster if s not in self.uploads]

    def unmask(self, reveals: Mapping[int, Mapping[str, Mapping[int, bytes]]]) -> np.ndarray:
        """Σ of the survivors' encoded vectors from the reveals of at least t survivors."""
        sent, lost = self.survivors()
        helpers = sorted(h for h in reveals if h in sent)
        if len(helpers) < self.threshold or len(sent) < self.threshold:
            raise SecAggError(f"secure aggregation: {len(helpers)} site(s) revealed shares, the threshold is {self.threshold}")
        seeds = {s: rebuild([reveals[h]["seed"][s] for h in helpers if s in reveals[h]["seed"]], self.threshold) for s in sent}
        keys = {s: rebuild([reveals[h]["key"][s] for h in helpers if s in reveals[h]["key"]], self.threshold) for s in lost}
        for site, key in keys.items():
            if public_key(key) != self.roster[site][1]:
                raise SecAggError(f"secure aggregation: the shares revealed for site {site} do not rebuild its key")
        total = np.zeros(next(iter(self.uploads.values())).shape, dtype=WORD)
        for site in sent:
            total = total + self.uploads[site]
        publics = {s: pair[1] for s, pair in self.roster.items()}
        return unmask(total, sent, seeds, keys, publics, self.nonce)
