"""Caption metrics the way the captioning literature computes them: pycocoevalcap (the COCO caption
evaluation code) with its PTB tokenizer, every reference of a video at once.

- ``bleu4``: BLEU with up to 4-grams, corpus level, brevity penalty from the closest reference length.
- ``meteor``: METEOR 1.5 (English, normalised), corpus level; runs ``meteor-1.5.jar``.
- ``rouge_l``: ROUGE-L F-measure (beta 1.2) from the best LCS precision and the best LCS recall over the
  references, averaged over videos.
- ``cider``: pycocoevalcap's ``Cider``, which is CIDEr-D (Vedantam et al., CVPR 2015):
  tf-idf weighted n-gram vectors (n = 1..4, raw n-gram counts, idf = log(#videos / #videos whose
  references hold the n-gram), so it depends on the whole evaluated corpus), candidate counts clipped
  by the reference's, a Gaussian length penalty (sigma 6), averaged over n and references, times 10.

Values are on pycocoevalcap's scale (BLEU-4, METEOR, ROUGE-L in 0..1; CIDEr 0..10): papers print them
times 100.

Java: the PTB tokenizer (Stanford CoreNLP 3.4.1) and METEOR are Java programs shipped inside
pycocoevalcap. Without a ``java`` on the PATH, a warning is logged once, METEOR is skipped (the result's
``skipped`` says so and why) and the text is tokenised by :func:`simple_tokenize`, a pure-Python stand-in
that is **not** the PTB tokenizer: the numbers are then not comparable to published ones (the result's
``tokenizer`` is ``"simple"``).
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, Literal

from ..errors import ConfigError, DataError

log = logging.getLogger("vision_ft")

METRICS = ("bleu4", "meteor", "rouge_l", "cider")
#: metrics that run a Java program (the tokenizer does too)
NEEDS_JAVA = ("meteor",)

_warned_no_java = False


def find_java() -> str | None:
    """The ``java`` executable pycocoevalcap will start (it calls ``java`` by name), or ``None``."""
    return shutil.which("java")


# --- tokenisation ----------------------------------------------------------------------------------

# Penn Treebank conventions the fallback copies: clitics split off ("isn't" -> "is n't", "man's" ->
# "man 's"), brackets written as -lrb- / -rrb- / -lcb- / -rcb- (lower-cased, as the PTB tokenizer's
# -lowerCase prints them; pycocoevalcap then keeps them, since its punctuation list is upper-case),
# words with inner hyphens, dots or apostrophes kept whole ("well-known", "3.5").
_CLITIC = re.compile(r"(?i)\b(\w+)(n't)\b|\b(\w+)('s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-.'&]\w+)*|\.\.\.|--|\S")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}


def _ptb_punctuation() -> set[str]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS
    # the PTB tokenizer writes " as `` or '' and dashes as --, all in that list
    return set(PUNCTUATIONS) | {'"', "\u2014", "\u2013"}


def simple_tokenize(text: str) -> str:
    """Lower-cased tokens joined by single spaces, punctuation dropped: a pure-Python stand-in for the
    PTB tokenizer when Java is missing. It follows the PTB conventions that matter for captions
    (clitics split, brackets as ``-lrb-``..., pycocoevalcap's punctuation list removed) but it is not
    the PTB tokenizer (e.g. abbreviations, quotes and unusual symbols may split differently), so
    scores computed after it are not comparable to published ones."""
    text = _CLITIC.sub(lambda m: f"{m.group(1)} {m.group(2)}" if m.group(1) else f"{m.group(3)} {m.group(4)}",
                       text.replace("\n", " ").lower())
    drop = _ptb_punctuation()
    tokens = (_BRACKETS.get(t, t) for t in _TOKEN.findall(text))
    return " ".join(t for t in tokens if t not in drop)


def _tokenize(texts: dict[Any, list[str]], how: str) -> dict[Any, list[str]]:
    # one line per caption: the PTB tokenizer runs line by line, and a \r or \u2028 would start a new one
    texts = {k: [" ".join(t.split()) for t in v] for k, v in texts.items()}
    if how == "simple":
        return {k: [simple_tokenize(t) for t in v] for k, v in texts.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    try:
        out = PTBTokenizer().tokenize({k: [{"caption": t} for t in v] for k, v in texts.items()})
    except OSError as e:  # it writes a temporary file next to its jar, inside the installed package
        raise ConfigError(f"the PTB tokenizer of pycocoevalcap could not run ({e}); it needs Java and a "
                          "writable pycocoevalcap install folder; or pass tokenizer='simple'") from e
    bad = [k for k, v in texts.items() if len(out.get(k, ())) != len(v)]
    if bad:
        raise RuntimeError(f"the PTB tokenizer returned the wrong number of lines for {bad[:3]}")
    return out


# --- scores ----------------------------------------------------------------------------------------

def _check(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> None:
    if not predictions:
        raise DataError("no predictions to score")
    missing, extra = [k for k in references if k not in predictions], [k for k in predictions if k not in references]
    if missing or extra:
        raise DataError(f"predictions and references must cover the same ids: {len(missing)} id(s) without a "
                        f"prediction (first {missing[:3]}), {len(extra)} prediction(s) without references "
                        f"(first {extra[:3]})")
    for k, p in predictions.items():
        if not isinstance(p, str):
            raise DataError(f"id {k!r}: a prediction is one string, got {type(p).__name__}")
    for k, refs in references.items():
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise DataError(f"id {k!r}: references are a list of strings, got {type(refs).__name__}")
        if not refs:
            raise DataError(f"id {k!r}: no reference captions")
        for i, r in enumerate(refs):
            if not isinstance(r, str) or not r.strip():
                raise DataError(f"id {k!r}: reference {i} is empty or not a string ({r!r})")


def caption_scores(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], *,
                   metrics: Iterable[str] = METRICS,
                   tokenizer: Literal["ptb", "simple"] | None = None) -> dict[str, Any]:
    """BLEU-4, METEOR, ROUGE-L and CIDEr(-D) of one predicted caption per id against all its references.

    Returns ``{metric: float}`` for each computed metric, plus ``tokenizer`` (``"ptb"`` or ``"simple"``),
    ``count`` (number of ids) and ``skipped`` (``{metric: reason}``, empty when all ran).
    ``tokenizer=None`` uses the PTB tokenizer when Java is found, else :func:`simple_tokenize`.
    Errors (:class:`DataError`): no predictions, ids that differ between the two mappings, an id
    without references, an empty reference."""
    global _warned_no_java
    wanted = list(dict.fromkeys(metrics))
    unknown = [m for m in wanted if m not in METRICS]
    if unknown or not wanted:
        raise ConfigError(f"unknown caption metric(s) {unknown or wanted}: choose from {list(METRICS)}")
    if tokenizer not in (None, "ptb", "simple"):
        raise ConfigError(f"tokenizer={tokenizer!r}: choose 'ptb', 'simple' or None (PTB when Java is found)")
    _check(predictions, references)
    java = find_java()
    skipped: dict[str, str] = {}
    if java is None:
        reason = ("Java not found on the PATH (pycocoevalcap runs METEOR and the PTB tokenizer with 'java'; "
                  "install a JRE, e.g. apt-get install default-jre-headless)")
        if not _warned_no_java:
            log.warning("[vision_ft] caption metrics: %s; METEOR is skipped and captions are tokenised by a "
                        "pure-Python stand-in, so scores are not comparable to published ones", reason)
            _warned_no_java = True
        if tokenizer == "ptb":
            raise ConfigError(f"tokenizer='ptb' needs Java: {reason}")
        skipped.update({m: reason for m in wanted if m in NEEDS_JAVA})
    how = tokenizer or ("ptb" if java else "simple")

    ids = list(references)
    texts = {("ref", i): list(references[i]) for i in ids}
    texts.update({("pred", i): [predictions[i]] for i in ids})
    tokens = _tokenize(texts, how)
    gts = {n: tokens[("ref", i)] for n, i in enumerate(ids)}
    res = {n: tokens[("pred", i)] for n, i in enumerate(ids)}

    out: dict[str, Any] = {}
    for name in wanted:
        if name in skipped:
            continue
        out[name] = float(_score(name, gts, res))
    out.update(tokenizer=how, count=len(ids), skipped=skipped)
    return out


def _score(name: str, gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    if name == "bleu4":
        from pycocoevalcap.bleu.bleu import Bleu
        return Bleu(4).compute_score(gts, res, verbose=0)[0][3]
    if name == "rouge_l":
        from pycocoevalcap.rouge.rouge import Rouge
        return Rouge().compute_score(gts, res)[0]
    if name == "cider":
        from pycocoevalcap.cider.cider import Cider
        return Cider().compute_score(gts, res)[0]
    from pycocoevalcap.meteor.meteor import Meteor
    meteor = Meteor()  # starts the JVM (about 10 s: it loads the paraphrase table); closed when collected
    try:
        return meteor.compute_score(gts, res)[0]
    finally:
        del meteor


class CaptionScores:
    """Collects one prediction and its references per id (e.g. per validation batch of a Lightning task),
    then scores the whole set with :func:`caption_scores`: CIDEr's idf and BLEU are corpus-level, so
    scores of parts cannot be averaged. Not synchronised across ranks: gather the records first."""

    def __init__(self, metrics: Iterable[str] = METRICS, tokenizer: Literal["ptb", "simple"] | None = None) -> None:
        self.metrics, self.tokenizer = tuple(metrics), tokenizer
        self.predictions: dict[Hashable, str] = {}
        self.references: dict[Hashable, list[str]] = {}

    def update(self, id: Hashable, prediction: str, references: Sequence[str]) -> None:
        if id in self.predictions:
            raise DataError(f"id {id!r} was already added (one prediction per id)")
        if isinstance(references, str):
            raise DataError(f"id {id!r}: references are a list of strings, got one string")
        self.predictions[id] = prediction
        self.references[id] = list(references)

    def compute(self) -> dict[str, Any]:
        return caption_scores(self.predictions, self.references, metrics=self.metrics, tokenizer=self.tokenizer)

    def reset(self) -> None:
        self.predictions.clear()
        self.references.clear()

    def __len__(self) -> int:
        return len(self.predictions)
