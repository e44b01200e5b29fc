"""Caption metrics (pycocoevalcap: BLEU-4, METEOR, ROUGE-L, CIDEr-D) and the MSR-VTT / MSVD readers.

CIDEr is checked against a CIDEr-D written here from the paper's definition (Vedantam et al. 2015,
Sec. 8), not against pycocoevalcap's own numbers."""

from __future__ import annotations

import logging
import math
from collections import Counter

import pytest

from vision_ft.errors import ConfigError, DataError
from vision_ft.metrics import captioning
from vision_ft.metrics.captioning import CaptionScores, caption_scores, simple_tokenize

FAST = ("bleu4", "rouge_l", "cider")  # METEOR starts a JVM for ~10 s: only the slow test runs it
needs_java = pytest.mark.skipif(captioning.find_java() is None, reason="no java on the PATH")


def _no_java(monkeypatch):
    monkeypatch.setattr(captioning, "find_java", lambda: None)
    monkeypatch.setattr(captioning, "_warned_no_java", False)


# --- an independent CIDEr-D ------------------------------------------------------------------------

def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def cider_d(cands: dict, refs: dict, sigma: float = 6.0) -> dict:
    """CIDEr-D per video, on already tokenised lower-case text: g = count x log(N / df) with df the
    number of videos whose references contain the n-gram (an n-gram in no reference: df taken as 1),
    candidate weights clipped by the reference's, Gaussian length penalty, mean over n = 1..4 and over
    references, x 10."""
    n_videos = len(refs)
    df: Counter = Counter()
    for rs in refs.values():
        df.update({g for r in rs for n in range(1, 5) for g in _ngrams(r.split(), n)})

    def vec(words, n):
        return {g: c * math.log(n_videos / max(1, df[g])) for g, c in _ngrams(words, n).items()}

    scores = {}
    for vid, cand in cands.items():
        c = cand.split()
        per_ref = []
        for r in refs[vid]:
            s = r.split()
            sims = []
            for n in range(1, 5):
                gc, gs = vec(c, n), vec(s, n)
                nc, ns = math.sqrt(sum(v * v for v in gc.values())), math.sqrt(sum(v * v for v in gs.values()))
                dot = sum(min(v, gs.get(g, 0.0)) * gs.get(g, 0.0) for g, v in gc.items())
                sims.append(dot / (nc * ns) if nc and ns else 0.0)
            per_ref.append(10 * sum(sims) / 4 * math.exp(-((len(c) - len(s)) ** 2) / (2 * sigma ** 2)))
        scores[vid] = sum(per_ref) / len(per_ref)
    return scores


def mean(d: dict) -> float:
    return sum(d.values()) / len(d)


# --- hand-checkable cases --------------------------------------------------------------------------

def test_identical_caption_scores_one_and_disjoint_scores_zero():
    refs = {"a": ["a man is slicing a tomato"], "b": ["two dogs run across the green field"]}
    same = caption_scores({"a": "a man is slicing a tomato", "b": "two dogs run across the green field"}, refs,
                          metrics=FAST, tokenizer="simple")
    assert same["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert same["rouge_l"] == pytest.approx(1.0)
    # no n-gram is shared between the two videos, so every idf is log 2 and both cosines are 1
    assert same["cider"] == pytest.approx(10.0)
    assert same["skipped"] == {} and same["count"] == 2
    other = caption_scores({"a": "green field", "b": "tomato slicing"}, refs, metrics=FAST, tokenizer="simple")
    assert other["bleu4"] == pytest.approx(0.0, abs=1e-6)
    assert other["rouge_l"] == 0.0 and other["cider"] == 0.0


def test_one_matching_reference_among_twenty_is_enough():
    refs = [f"a person does thing number {k} slowly" for k in range(19)] + ["a cook stirs soup in a red pot"]
    s = caption_scores({"v": "A cook stirs soup in a red pot."}, {"v": refs}, metrics=("bleu4", "rouge_l"),
                       tokenizer="simple")
    assert s["bleu4"] == pytest.approx(1.0, abs=1e-6)  # clipped counts take the max over references
    assert s["rouge_l"] == pytest.approx(1.0)  # the best reference by LCS


def test_cider_matches_an_independent_cider_d_on_a_tiny_corpus():
    refs = {
        "v1": ["a man is playing a guitar", "a man plays the guitar on a stage", "someone plays music"],
        "v2": ["a woman is cooking pasta", "a woman cooks food in a kitchen"],
        "v3": ["a dog runs on the beach", "a dog is running", "a brown dog runs along the water"],
    }
    # repeated n-grams (clipping) and lengths 3..7 (length penalty) on purpose
    cands = {"v1": "a man plays a guitar a guitar", "v2": "a woman is cooking", "v3": "a cat sleeps on a sofa"}
    got = caption_scores(cands, refs, metrics=("cider",), tokenizer="simple")["cider"]
    assert got == pytest.approx(mean(cider_d(cands, refs)), rel=1e-9)
    assert got > 0.5  # not a degenerate 0 = 0


def test_cider_idf_is_corpus_level():
    refs = {"v1": ["a man is playing a guitar", "a man plays the guitar"],
            "v2": ["a woman is cooking pasta", "a woman cooks food"]}
    cands = {"v1": "a man is playing a guitar", "v2": "a woman is cooking"}
    # a third video whose references also say "a man is playing": those n-grams become less informative
    refs3 = {**refs, "v3": ["a man is playing football", "a man is playing on grass"]}
    cands3 = {**cands, "v3": "a man is playing"}
    two = caption_scores(cands, refs, metrics=("cider",), tokenizer="simple")["cider"]
    three = caption_scores(cands3, refs3, metrics=("cider",), tokenizer="simple")["cider"]
    assert two == pytest.approx(mean(cider_d(cands, refs)), rel=1e-9)
    assert three == pytest.approx(mean(cider_d(cands3, refs3)), rel=1e-9)
    # the same prediction for v1 against the same references scores less in the larger corpus
    assert cider_d(cands3, refs3)["v1"] < cider_d(cands, refs)["v1"] - 0.1


def test_ngrams_every_video_shares_carry_no_cider_weight():
    refs = {"v1": ["a man is walking a dog"], "v2": ["a man is cutting bread"], "v3": ["a man is swimming"]}
    s = caption_scores({"v1": "a man is", "v2": "a man is", "v3": "a man is"}, refs, metrics=FAST,
                       tokenizer="simple")
    assert s["cider"] == 0.0  # idf log(3/3) = 0 for every n-gram of the candidates
    assert s["rouge_l"] > 0.5  # while the word overlap is large


def test_a_single_video_has_zero_cider():
    # with one video every reference n-gram has df = N = 1: idf 0, so CIDEr needs a corpus
    s = caption_scores({"v": "a man is running fast"}, {"v": ["a man is running fast"]}, metrics=FAST,
                       tokenizer="simple")
    assert s["cider"] == 0.0 and s["bleu4"] == pytest.approx(1.0, abs=1e-6)


# --- tokenisation and Java -------------------------------------------------------------------------

def test_simple_tokenizer_follows_ptb_conventions():
    assert simple_tokenize("A man's dog isn't running, fast.") == "a man 's dog is n't running fast"
    assert simple_tokenize('Two people "dance" (slowly) -- they\'re tired...') == \
        "two people dance -lrb- slowly -rrb- they 're tired"
    assert simple_tokenize("A well-known 3.5 kg weight\nis lifted!") == "a well-known 3.5 kg weight is lifted"


@needs_java
def test_simple_tokenizer_agrees_with_ptb_on_plain_captions():
    caps = ["A man's dog isn't running, fast.", "Two people can't \"dance\" together; they're tired...",
            "A woman is slicing an onion (quickly).", "The well-known chef adds 3.5 cups of flour!"]
    ptb = captioning._tokenize({i: [c] for i, c in enumerate(caps)}, "ptb")
    assert [ptb[i][0] for i in range(len(caps))] == [simple_tokenize(c) for c in caps]


@needs_java
def test_ptb_tokenizer_is_used_when_java_is_found():
    refs = {"a": ["A man is slicing a tomato."], "b": ["Two dogs run across the green field!"]}
    s = caption_scores({"a": "a man is slicing a tomato", "b": "two dogs run"}, refs, metrics=FAST)
    assert s["tokenizer"] == "ptb" and s["skipped"] == {}
    assert s["rouge_l"] < 1.0 and s["bleu4"] > 0.0


def test_without_java_meteor_is_skipped_and_the_rest_computed(monkeypatch, caplog):
    _no_java(monkeypatch)
    refs = {"a": ["A man is slicing a tomato."], "b": ["Two dogs run across the green field!"]}
    preds = {"a": "A man is slicing a tomato", "b": "two dogs run across the field"}
    with caplog.at_level(logging.WARNING, logger="vision_ft"):
        s = caption_scores(preds, refs)
        caption_scores(preds, refs)
    assert set(s) == {"bleu4", "rouge_l", "cider", "tokenizer", "count", "skipped"}
    assert "meteor" in s["skipped"] and "Java" in s["skipped"]["meteor"]
    assert s["tokenizer"] == "simple"
    assert s["rouge_l"] == pytest.approx(1.0 / 2 + (1.2 ** 2 + 1) * 1 * (6 / 7) / ((6 / 7) + 1.2 ** 2 * 1) / 2)
    warnings = [r for r in caplog.records if "Java" in r.getMessage()]
    assert len(warnings) == 1 and "not comparable" in warnings[0].getMessage()
    with pytest.raises(ConfigError, match="needs Java"):
        caption_scores(preds, refs, tokenizer="ptb")


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("preds, refs, match", [
    ({}, {}, "no predictions"),
    ({"a": "x"}, {"a": ["x"], "b": ["y"]}, r"1 id\(s\) without a prediction \(first \['b'\]\)"),
    ({"a": "x", "c": "z"}, {"a": ["x"]}, r"1 prediction\(s\) without references \(first \['c'\]\)"),
    ({"a": "x"}, {"a": []}, "id 'a': no reference captions"),
    ({"a": "x"}, {"a": ["ok", "  "]}, "id 'a': reference 1 is empty"),
    ({"a": "x"}, {"a": "one string"}, "list of strings"),
    ({"a": 3}, {"a": ["x"]}, "one string, got int"),
])
def test_bad_input_is_a_data_error_naming_the_id(preds, refs, match):
    with pytest.raises(DataError, match=match):
        caption_scores(preds, refs, metrics=FAST, tokenizer="simple")


def test_unknown_metric_or_tokenizer():
    with pytest.raises(ConfigError, match="spice"):
        caption_scores({"a": "x"}, {"a": ["x"]}, metrics=("spice",))
    with pytest.raises(ConfigError, match="tokenizer"):
        caption_scores({"a": "x"}, {"a": ["x"]}, tokenizer="nltk")


def test_accumulator_scores_the_whole_set():
    acc = CaptionScores(metrics=FAST, tokenizer="simple")
    data = [("v1", "a man plays a guitar", ["a man is playing a guitar", "a man plays the guitar"]),
            ("v2", "a woman is cooking", ["a woman is cooking pasta"]),
            ("v3", "a dog", ["a dog runs on the beach"])]
    for vid, p, r in data:
        acc.update(vid, p, r)
    assert len(acc) == 3
    direct = caption_scores({v: p for v, p, _ in data}, {v: r for v, _, r in data}, metrics=FAST, tokenizer="simple")
    assert acc.compute() == direct
    with pytest.raises(DataError, match="'v1' was already added"):
        acc.update("v1", "again", ["x"])
    acc.reset()
    assert len(acc) == 0


@pytest.mark.slow
@needs_java
def test_meteor_runs_with_java():
    refs = {"a": ["a man is slicing a tomato", "someone cuts a tomato"], "b": ["two dogs run across the field"]}
    same = caption_scores({"a": "a man is slicing a tomato", "b": "two dogs run across the field"}, refs)
    assert same["meteor"] == pytest.approx(1.0) and same["skipped"] == {}
    none = caption_scores({"a": "green grass", "b": "an old car"}, refs, metrics=("meteor",))
    assert none["meteor"] == 0.0
