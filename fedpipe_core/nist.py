"""NIST as MT-Eval v13a computes it (Doddington 2002), the figure the E2E challenge's official script reports.

Written from the definition: every n-gram's information weight comes from the references of the whole
test set, info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)), the count of the empty prefix being the
number of reference words; a hypothesis n-gram earns its weight as many times as it occurs, clipped at its
largest count in one reference of its segment; each order's earned information is divided by the number of
hypothesis n-grams of that order, the orders 1..n summed, and the sum multiplied by the brevity penalty
exp(-β log²(L_sys / L_ref)) (1 when the system is at least as long), L_ref being the sum over segments of the
mean reference length and β such that a length ratio of 1.5 (inverse: 2/3) costs half the score.
Tokens are given: MT-Eval lower-cases and tokenises with its own rules (sacrebleu's 13a tokenizer), see
:func:`fedpipe_core.metrics.normalise`.
"""

from __future__ import annotations

import math
from collections import Counter

BETA = -math.log(0.5) / math.log(1.5) ** 2
"""The brevity penalty's β: exp(-β log²(2/3)) = 0.5."""

Tokens = list[str]


def ngram_counts(tokens: Tokens, n: int) -> Counter[tuple[str, ...]]:
    """The n-grams of a token list and how often each occurs."""
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def information_weights(references: list[list[Tokens]], order: int) -> list[Counter[tuple[str, ...]]]:
    """Counts of every reference n-gram of orders 0..``order`` over the test set (order 0: the word count)."""
    counts: list[Counter[tuple[str, ...]]] = [Counter() for _ in range(order + 1)]
    for segment in references:
        for reference in segment:
            counts[0][()] += len(reference)
            for n in range(1, order + 1):
                counts[n].update(ngram_counts(reference, n))
    return counts


def brevity_penalty(system_length: float, reference_length: float) -> float:
    """NIST's length penalty: 1 for a system at least as long as the references, exp(-β log² ratio) below."""
    ratio = system_length / reference_length if reference_length else 0.0
    if ratio >= 1.0:
        return 1.0
    if ratio <= 0.0:
        return 0.0
    return math.exp(-BETA * math.log(ratio) ** 2)


def corpus_nist(hypotheses: list[Tokens], references: list[list[Tokens]], order: int = 5) -> float:
    """NIST-``order`` of tokenised hypotheses, each against all references of its segment."""
    if len(hypotheses) != len(references) or any(not refs for refs in references):
        raise ValueError("corpus_nist: every hypothesis needs at least one reference")
    counts = information_weights(references, order)
    earned, total = [0.0] * (order + 1), [0] * (order + 1)
    system_length, reference_length = 0, 0.0
    for hypothesis, segment in zip(hypotheses, references):
        system_length += len(hypothesis)
        reference_length += sum(len(r) for r in segment) / len(segment)
        for n in range(1, order + 1):
            found = ngram_counts(hypothesis, n)
            total[n] += sum(found.values())
            clip: Counter[tuple[str, ...]] = Counter()
            for reference in segment:
                clip |= ngram_counts(reference, n)  # element-wise max over the references
            earned[n] += sum(
                math.log2(counts[n - 1][gram[:-1]] / counts[n][gram]) * min(count, clip[gram])
                for gram, count in found.items()
                if gram in clip
            )
    score = sum(earned[n] / total[n] for n in range(1, order + 1) if total[n])
    return score * brevity_penalty(system_length, reference_length)
