"""E2E NLG scores as the challenge's official script (tuetschek/e2e-metrics) computes them: multi-reference per MR.

- BLEU (sacrebleu, 0-100) and NIST (n = 5, :mod:`fedpipe_core.nist`, as MT-Eval v13a) on text lower-cased and
  tokenised by MT-Eval's rules (sacrebleu's 13a tokenizer), as the script's MT-Eval port does;
- METEOR 1.5, ROUGE-L and CIDEr (pycocoevalcap, the scorers the script runs through the MS-COCO caption
  evaluation) after pycocoevalcap's PTB tokenizer (Stanford CoreNLP's, lower-cased, punctuation removed).

Both the PTB tokenizer and METEOR are Java programs. Without a Java runtime METEOR is left out and ROUGE-L and
CIDEr are computed after the 13a tokenisation instead (:func:`scorer` names which: it goes into every summary).
Tested against the official figures on ``tests/data/e2e-official-scores.json``.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import pycocoevalcap.tokenizer.ptbtokenizer as ptb
import sacrebleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from fedpipe_core.nist import corpus_nist

METRIC_NAMES = ("bleu", "nist", "meteor", "rouge_l", "cider")
SCORER = "e2e-official-v1"
"""The scorer of this version: NIST as MT-Eval v13a, METEOR / ROUGE-L / CIDEr after the PTB tokenizer. Figures
recorded before it (no ``scorer`` key) used nltk's NIST and a 13a tokenisation for all five."""
_TOKENIZE = Tokenizer13a()


def normalise(text: str) -> str:
    """Lower-case and 13a-tokenise (tokens separated by single spaces): MT-Eval's tokenisation."""
    return " ".join(_TOKENIZE(text.lower().strip()).split())


def scorer() -> str:
    """What scores E2E on this machine: :data:`SCORER`, or its Java-less variant."""
    return SCORER if not meteor_missing() else f"{SCORER}-no-java (no METEOR; ROUGE-L and CIDEr after 13a)"


def ptb_tokenize(texts: list[str]) -> list[str]:
    """pycocoevalcap's PTB tokenisation (its jar, its flags, its punctuation list), written to a private temporary
    directory rather than into the installed package."""
    jar = Path(ptb.__file__).parent / ptb.STANFORD_CORENLP_3_4_1_JAR
    with tempfile.TemporaryDirectory() as directory:
        source = Path(directory) / "sentences.txt"
        source.write_text("\n".join(t.replace("\n", " ") for t in texts), encoding="utf-8")
        command = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", str(source)]
        lines = subprocess.run(command, capture_output=True, check=True, timeout=600).stdout.decode("utf-8").split("\n")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS) for line in lines[: len(texts)]]


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
    """Score one hypothesis per MR against all references of that MR (see the module's note)."""
    keys = sorted(hypotheses)
    missing = [k for k in keys if not references.get(k)]
    if not keys or missing:
        raise ValueError(f"e2e_scores: {len(missing)} hypothesis(es) without references, {len(keys)} in all")
    hyps = [normalise(hypotheses[k]) or "." for k in keys]
    refs = [[normalise(r) for r in references[k]] for k in keys]
    width = max(len(r) for r in refs)
    ref_streams = [[r[i] if i < len(r) else None for r in refs] for i in range(width)]
    scores = {
        "bleu": float(sacrebleu.corpus_bleu(hyps, ref_streams, tokenize="none", force=True).score),
        "nist": corpus_nist([h.split() for h in hyps], [[r.split() for r in rs] for rs in refs]),
    }
    java = not meteor_missing()
    if java:  # the MS-COCO scorers' own tokenisation
        flat = ptb_tokenize([hypotheses[k] for k in keys] + [r for k in keys for r in references[k]])
        rest = iter(flat[len(keys) :])
        hyps = [h or "." for h in flat[: len(keys)]]
        refs = [[next(rest) for _ in references[k]] for k in keys]
    gts = {i: rs for i, rs in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    with contextlib.redirect_stdout(io.StringIO()):
        if java:
            with _meteor() as meteor:
                scores["meteor"] = float(meteor.compute_score(gts, res)[0])
        scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
        scores["cider"] = float(Cider().compute_score(gts, res)[0])
    return scores
