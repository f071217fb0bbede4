"""Secure aggregation's cryptographic core: the server learns only Σ_k x_k (Bonawitz et al., CCS 2017).

Each site k holds an X25519 key pair and a fresh self-mask seed b_k per round. For every other site j, k and j
agree on a pair key (X25519, then HKDF-SHA256 bound to the round's ``context``); k adds the pair mask expanded
from it (ChaCha20 keystream) when k < j and subtracts it when k > j, and adds its self mask, all modulo 2^64 on
a fixed-point encoding of its vector. Summed over every site that sent, the pair masks cancel; the server then
removes the survivors' self masks and, for a site lost after masking, the pair masks the survivors added with it.
For that, each site splits its private key and its self seed into Shamir shares (t of n, over GF(2^128) in
16-byte blocks: pycryptodome's ``Crypto.Protocol.SecretSharing.Shamir``, as Flower's secure aggregation uses it)
and gives one of each to every other site
(encrypted to it in transit by the protocol around this module); for each site the survivors reveal either the
shares of its self seed (it sent) or of its private key (it did not), never both.

What it assumes: at most t − 1 sites collude with the server (fewer shares reveal nothing), the sites' public
keys reach each other unaltered (the server relays them; an active server that swaps keys is outside this
model, as in the paper's semi-honest setting), and the vectors lie within the stated fixed-point range
(:func:`encode` refuses a value outside it; :func:`check_capacity` refuses a sum that could wrap).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

WORD = np.uint64
"""Masked vectors live in Z_{2^64}: numpy's unsigned arithmetic wraps exactly there."""


class SecAggError(ValueError):
    """A vector out of the encodable range, a sum that could wrap, or too few shares to unmask."""


@dataclass(frozen=True)
class FixedPoint:
    """Values in [−bound, bound] as round(x · 2^frac_bits), two's complement in 64 bits."""

    bound: float = 16.0
    frac_bits: int = 32

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Fixed-point words of ``values``; a value outside ±``bound`` (or not finite) is refused, never clipped."""
        values = np.asarray(values, dtype=np.float64)
        if not np.isfinite(values).all() or (np.abs(values) > self.bound).any():
            worst = float(np.nanmax(np.abs(np.where(np.isfinite(values), values, np.inf)))) if values.size else 0.0
            raise SecAggError(f"secure aggregation: a value of magnitude {worst:.4g} is outside the range ±{self.bound:g}")
        return np.rint(values * 2.0**self.frac_bits).astype(np.int64).view(WORD)

    def decode(self, words: np.ndarray) -> np.ndarray:
        """The float values of (a sum of) encoded words."""
        return np.asarray(words, dtype=WORD).view(np.int64).astype(np.float64) / 2.0**self.frac_bits

    def check_capacity(self, sites: int) -> None:
        """Refuse a round whose sum of ``sites`` vectors could leave the signed 64-bit range (and wrap silently)."""
        if sites * self.bound * 2.0**self.frac_bits >= 2.0**63:
            raise SecAggError(
                f"secure aggregation: {sites} sites × range ±{self.bound:g} at {self.frac_bits} fractional bits can "
                "overflow 64 bits; lower the range or the fractional bits"
            )


def new_private_key() -> bytes:
    """A fresh X25519 private key, raw 32 bytes."""
    return X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def public_key(private: bytes) -> bytes:
    """The raw 32-byte X25519 public key of ``private``."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def pair_key(private: bytes, peer_public: bytes, context: bytes, purpose: bytes = b"pair mask") -> bytes:
    """The 32-byte key two sites share: X25519 agreement, then HKDF-SHA256 bound to the round's ``context`` and to
    what the key is for (``purpose``: a pair mask, or the encryption of the shares one site deals the other)."""
    secret = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(hashes.SHA256(), 32, salt=context, info=b"fedpipe secagg " + purpose).derive(secret)


def expand(key: bytes, length: int) -> np.ndarray:
    """``length`` uniform 64-bit words from a 32-byte key: the ChaCha20 keystream (each key is used for one mask)."""
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(8 * length))
    return np.frombuffer(stream, dtype="<u8").astype(WORD)


def masked(
    words: np.ndarray,
    site: int,
    private: bytes,
    self_seed: bytes,
    publics: Mapping[int, bytes],
    context: bytes,
) -> np.ndarray:
    """Site ``site``'s upload: its encoded words + its self mask ± a pair mask with every other site in ``publics``."""
    out = np.asarray(words, dtype=WORD) + expand(self_seed, words.size).reshape(words.shape)
    for peer, peer_public in sorted(publics.items()):
        if peer == site:
            continue
        mask = expand(pair_key(private, peer_public, context), words.size).reshape(words.shape)
        out = out + mask if site < peer else out - mask
    return out


def unmask(
    total: np.ndarray,
    sent: list[int],
    self_seeds: Mapping[int, bytes],
    lost_private: Mapping[int, bytes],
    publics: Mapping[int, bytes],
    context: bytes,
) -> np.ndarray:
    """Σ of the senders' encoded words from Σ of their uploads: remove each sender's self mask (its reconstructed
    seed) and the pair masks each sender added with a site lost after masking (from that site's private key)."""
    out = np.asarray(total, dtype=WORD).copy()
    for site in sent:
        out = out - expand(self_seeds[site], out.size).reshape(out.shape)
    for lost, private in sorted(lost_private.items()):
        for site in sent:
            mask = expand(pair_key(private, publics[site], context), out.size).reshape(out.shape)
            out = out - mask if site < lost else out + mask  # what the sender added with the lost site, taken back
    return out


def new_self_seed() -> bytes:
    """A fresh 32-byte self-mask seed."""
    return os.urandom(32)


def split(secret: bytes, threshold: int, sites: int) -> list[bytes]:
    """Shamir shares of a 32-byte ``secret``: any ``threshold`` of the ``sites`` shares rebuild it, fewer reveal
    nothing. A share is its 1-based index (one byte) and one 16-byte share per 16-byte block of the secret."""
    if not 1 < threshold <= sites <= 255:
        raise SecAggError(f"secure aggregation: threshold {threshold} must be in 2..{sites} (the number of sites, ≤ 255)")
    if len(secret) != 32:
        raise SecAggError(f"secure aggregation: a secret to share is 32 bytes, got {len(secret)}")
    blocks = [Shamir.split(threshold, sites, secret[i : i + 16], ssss=False) for i in (0, 16)]
    return [bytes([index]) + b"".join(dict(block)[index] for block in blocks) for index in range(1, sites + 1)]


def rebuild(shares: list[bytes], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares (fewer give a wrong one: refused here)."""
    if len(shares) < threshold:
        raise SecAggError(f"secure aggregation: {len(shares)} share(s) cannot rebuild a secret split {threshold}-of-n")
    chosen = shares[:threshold]
    return b"".join(Shamir.combine([(s[0], s[1 + 16 * b : 17 + 16 * b]) for s in chosen], ssss=False) for b in (0, 1))
