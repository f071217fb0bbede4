"""E2E NLG scores, computed the way the challenge's script does: multi-reference per MR.

BLEU (sacrebleu, 0-100), NIST (nltk, n=5), METEOR 1.5, ROUGE-L and CIDEr (pycocoevalcap, the
scorers the official script wraps). Every hypothesis and reference is lower-cased and
tokenised with sacrebleu's 13a tokenizer first, the same for all five metrics. METEOR runs a Java
program: on a machine without a Java runtime it is left out (:func:`meteor_missing` says why), the
other four are scored.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Iterator, Mapping

import sacrebleu
from nltk.translate.nist_score import corpus_nist
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

METRIC_NAMES = ("bleu", "nist", "meteor", "rouge_l", "cider")
_TOKENIZE = Tokenizer13a()


def normalise(text: str) -> str:
    """Lower-case and 13a-tokenise (tokens separated by single spaces)."""
    return " ".join(_TOKENIZE(text.lower().strip()).split())


def _nist(refs: list[list[list[str]]], hyps: list[list[str]], n: int = 5) -> float:
    """NIST-n; n-gram orders longer than every hypothesis add 0, as in mteval (nltk would divide by 0)."""
    order = min(n, max(len(h) for h in hyps))
    return corpus_nist(refs, hyps, n=order) if order > 0 else 0.0


@contextlib.contextmanager
def _meteor() -> Iterator[Meteor]:
    """The METEOR 1.5 scorer (a Java process), its process and every pipe closed afterwards."""
    scorer = Meteor()
    try:
        yield scorer
    finally:
        process = scorer.meteor_p
        for pipe in (process.stdin, process.stdout, process.stderr):
            pipe.close()
        process.kill()
        process.wait()


def meteor_missing() -> str:
    """Why METEOR cannot be scored on this machine ('' when it can): it needs a Java runtime on the PATH."""
    if shutil.which("java") is None:
        return "METEOR not scored: no Java runtime ('java') on the PATH (install a JRE, e.g. Debian's default-jre-headless)"
    return ""


def e2e_scores(hypotheses: Mapping[str, str], references: Mapping[str, list[str]]) -> dict[str, float]:
    """Score one hypothesis per MR against all references of that MR."""
    keys = sorted(hypotheses)
    missing = [k for k in keys if not references.get(k)]
    if not keys or missing:
        raise ValueError(f"e2e_scores: {len(missing)} hypothesis(es) without references, {len(keys)} in all")
    hyps = [normalise(hypotheses[k]) or "." for k in keys]
    refs = [[normalise(r) for r in references[k]] for k in keys]
    width = max(len(r) for r in refs)
    ref_streams = [[r[i] if i < len(r) else None for r in refs] for i in range(width)]
    bleu = sacrebleu.corpus_bleu(hyps, ref_streams, tokenize="none", force=True).score
    nist = _nist([[r.split() for r in rs] for rs in refs], [h.split() for h in hyps])
    gts = {i: rs for i, rs in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    scores = {"bleu": float(bleu), "nist": float(nist)}
    with contextlib.redirect_stdout(io.StringIO()):
        if not meteor_missing():
            with _meteor() as meteor:
                scores["meteor"] = float(meteor.compute_score(gts, res)[0])
        scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
        scores["cider"] = float(Cider().compute_score(gts, res)[0])
    return scores
