"""Caption metrics (pycocoevalcap: BLEU-4, METEOR, ROUGE-L, CIDEr-D) and the MSR-VTT / MSVD readers.

CIDEr is checked against a CIDEr-D written here from the paper's definition (Vedantam et al., CVPR
2015), not against pycocoevalcap's own numbers."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter

import pytest

from vision_ft.data import caption_datasets as cd
from vision_ft.data.caption_datasets import convert_captions, msrvtt_records, msvd_records, read_msrvtt, write_jsonl
from vision_ft.errors import ConfigError, DataError
from vision_ft.metrics import captioning
from vision_ft.metrics.captioning import CaptionScores, caption_scores, simple_tokenize

FAST = ("bleu4", "rouge_l", "cider")  # METEOR starts a JVM for ~10 s: only the slow test runs it
_no_java_here = pytest.mark.skipif(captioning.find_java() is None, reason="no java on the PATH")


def needs_java(test):
    """Skipped without Java; the JVM it starts gets a time limit."""
    return pytest.mark.timeout(120)(_no_java_here(test))


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


@pytest.mark.parametrize("tokenizer", [pytest.param("ptb", marks=[_no_java_here, pytest.mark.timeout(120)]), "simple"])
def test_empty_and_multi_line_predictions_are_scored(tokenizer):
    refs = {"a": ["a man runs"], "b": ["a dog barks"], "c": ["a cat sleeps"]}
    s = caption_scores({"a": "a man\r\nruns", "b": "...", "c": ""}, refs, metrics=("rouge_l",), tokenizer=tokenizer)
    assert s["rouge_l"] == pytest.approx(1 / 3)  # "a" is exact; nothing is left of "b" and "c"


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


# === MSR-VTT and MSVD readers ======================================================================

# 12 fake MSR-VTT videos: 7 train, 2 validate, 3 test; video3 has 20 captions
MSRVTT_SPLITS = ["train"] * 7 + ["validate"] * 2 + ["test"] * 3


def _msrvtt(tmp_path, videos=None, sentences=None, name="videodatainfo.json", files=True):
    if videos is None:
        videos = [{"video_id": f"video{i}", "id": i, "split": s, "category": 3} for i, s in enumerate(MSRVTT_SPLITS)]
    if sentences is None:
        sentences = []
        for v in videos:
            n = 20 if v["video_id"] == "video3" else 2
            sentences += [{"video_id": v["video_id"], "caption": f" {v['video_id']} caption {k} ", "sen_id": k}
                          for k in range(n)]
    path = tmp_path / name
    path.write_text(json.dumps({"info": {}, "videos": videos, "sentences": sentences}))
    root = tmp_path / "videos"
    if files:
        for v in videos:
            folder = root / ("TestVideo" if v.get("split") == "test" else "TrainValVideo")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{v['video_id']}.mp4").write_bytes(b"")
    root.mkdir(exist_ok=True)
    return path, root


def test_msrvtt_split_field_gives_records_in_the_conversation_format(tmp_path, caplog):
    path, root = _msrvtt(tmp_path)
    with caplog.at_level(logging.INFO, logger="vision_ft"):
        train = msrvtt_records(path, root, "train", prompt="What happens?")
    val, test = msrvtt_records(path, root, "val"), msrvtt_records(path, root, "test")
    assert [r["id"] for r in train] == [f"video{i}" for i in range(7)]
    assert [r["id"] for r in val] == ["video7", "video8"] and [r["id"] for r in test] == ["video9", "video10",
                                                                                          "video11"]
    assert train[3] == {
        "id": "video3", "video": "TrainValVideo/video3.mp4",
        "conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                          {"from": "gpt", "value": "video3 caption 0"}],
        "references": [f"video3 caption {k}" for k in range(20)]}
    assert test[0]["video"] == "TestVideo/video9.mp4"
    assert test[0]["conversations"][0]["value"] == "<video>\nDescribe the video in one sentence."
    message = next(r.getMessage() for r in caplog.records if "MSR-VTT" in r.getMessage())
    assert "the 'split' field (12 videos)" in message and "train 7, val 2, test 3" in message
    assert "not the standard" in message


def test_msrvtt_without_split_field_uses_the_video_number(tmp_path, caplog):
    numbers = [0, 6512, 6513, 7009, 7010, 9999]
    videos = [{"video_id": f"video{n}"} if n % 2 else {"video_id": f"video{n}", "id": n} for n in numbers]
    path, root = _msrvtt(tmp_path, videos=videos)
    for v in videos:
        (root / "TrainValVideo" / f"{v['video_id']}.mp4").rename(root / f"{v['video_id']}.mp4")
    with caplog.at_level(logging.INFO, logger="vision_ft"):
        got = {s: [r["id"] for r in msrvtt_records(path, root, s)] for s in ("train", "val", "test")}
    assert got == {"train": ["video0", "video6512"], "val": ["video6513", "video7009"],
                   "test": ["video7010", "video9999"]}
    assert any("video number" in r.getMessage() and "(6 videos)" in r.getMessage() for r in caplog.records)


def test_msrvtt_full_numbering_is_the_standard_split(tmp_path):
    videos = [{"video_id": f"video{i}"} for i in range(10000)]
    path, _ = _msrvtt(tmp_path, videos=videos, sentences=[{"video_id": v["video_id"], "caption": "x"}
                                                          for v in videos], files=False)
    splits, captions, rule = read_msrvtt(path)
    assert Counter(splits.values()) == {"train": 6513, "val": 497, "test": 2990}
    assert splits["video6512"] == "train" and splits["video6513"] == "val" and splits["video7010"] == "test"
    assert "video number" in rule and len(captions["video42"]) == 1


def test_msrvtt_reads_the_train_val_and_test_files_together(tmp_path):
    videos = [{"video_id": f"video{i}", "split": s} for i, s in enumerate(MSRVTT_SPLITS)]
    trainval, root = _msrvtt(tmp_path, videos=videos[:9], name="train_val_videodatainfo.json")
    test, _ = _msrvtt(tmp_path, videos=videos[9:], name="test_videodatainfo.json")
    assert [r["id"] for r in msrvtt_records([trainval, test], root, "test")] == ["video9", "video10", "video11"]
    assert len(msrvtt_records([trainval, test], root, "train")) == 7


@pytest.mark.parametrize("change, match", [
    (lambda v, s: v[2].pop("video_id"), r"videodatainfo.json \[videos\]\[2\]: missing 'video_id'"),
    (lambda v, s: v[4].update(split="dev"), r"\[videos\]\[4\]: video 'video4' has unknown split 'dev'"),
    (lambda v, s: s[5].pop("caption"), r"\[sentences\]\[5\]: missing 'caption'"),
    (lambda v, s: s[5].update(video_id="video99"), r"\[sentences\]\[5\]: caption for video 'video99'"),
    (lambda v, s: s[6].update(caption="  "), r"\[sentences\]\[6\]: empty caption for video 'video3'"),
    (lambda v, s: s.__setitem__(slice(None), [x for x in s if x["video_id"] != "video5"]),
     r"1 video\(s\) without captions .*'video5'"),
    (lambda v, s: v.append(dict(v[0])), r"\[videos\]\[12\]: video 'video0' is listed twice"),
    (lambda v, s: (v[0].pop("split"), v[0].pop("id"), v[0].update(video_id="clip0")),
     r"'clip0' has no 'split' and no 'id'"),
])
def test_msrvtt_bad_annotations_name_the_file_and_the_entry(tmp_path, change, match):
    videos = [{"video_id": f"video{i}", "id": i, "split": s} for i, s in enumerate(MSRVTT_SPLITS)]
    sentences = [{"video_id": v["video_id"], "caption": f"caption {k}"} for v in videos for k in range(2)]
    change(videos, sentences)
    path, root = _msrvtt(tmp_path, videos=videos, sentences=sentences, files=False)
    with pytest.raises(DataError, match=match):
        msrvtt_records(path, root, "train")


def test_msrvtt_missing_videos_are_an_error_or_left_out(tmp_path, caplog):
    path, root = _msrvtt(tmp_path)
    (root / "TrainValVideo" / "video4.mp4").unlink()
    with pytest.raises(DataError, match=r"1 video\(s\) not found under .*\['video4'\].*missing='skip'"):
        msrvtt_records(path, root, "train")
    with caplog.at_level(logging.WARNING, logger="vision_ft"):
        kept = msrvtt_records(path, root, "train", missing="skip")
    assert [r["id"] for r in kept] == ["video0", "video1", "video2", "video3", "video5", "video6"]
    assert any("left out" in r.getMessage() for r in caplog.records)
    assert len(msrvtt_records(path, root, "test")) == 3  # other splits do not need video4
    with pytest.raises(ConfigError, match="split='dev'"):
        msrvtt_records(path, root, "dev")
    with pytest.raises(DataError, match="video folder not found"):
        msrvtt_records(path, tmp_path / "nowhere", "train")


def test_a_video_folder_of_frames_counts_and_a_duplicate_is_an_error(tmp_path):
    path, root = _msrvtt(tmp_path)
    (root / "TrainValVideo" / "video1.mp4").unlink()
    (root / "frames" / "video1").mkdir(parents=True)
    (root / "frames" / "video1" / "000.jpg").write_bytes(b"")
    assert msrvtt_records(path, root, "train")[1]["video"] == "frames/video1"
    (root / "video2.avi").write_bytes(b"")
    with pytest.raises(DataError, match="'video2' is there twice"):
        msrvtt_records(path, root, "train")


# --- MSVD ------------------------------------------------------------------------------------------

# code-point order (what the literature's youtube_mapping.txt follows), written out by hand:
# '-' < digits < upper case < '_' < lower case, and "215" < "21_"
MSVD_ORDER = ["-Yx_1_3", "-_hb_18_25", "0lh_UWF9ZP4_215_226", "0lh_UWF9ZP4_21_26", "9q_4_8", "A_1_2",
              "Zz9_1_2", "_aa_3_4", "aB_0_1", "ab_0_1", "ab_10_2", "zz_7_9"]
SIZES = (6, 2, 4)


def _msvd(tmp_path, clips=MSVD_ORDER, files=True):
    shuffled = clips[5:] + clips[:5][::-1]
    lines = ["# MSVD-style descriptions", ""]
    for k in range(3):
        lines += [f"{c} {c} does thing {k}." for c in shuffled]
    path = tmp_path / "AllVideoDescriptions.txt"
    path.write_text("\n".join(lines) + "\n")
    root = tmp_path / "YouTubeClips"
    root.mkdir(exist_ok=True)
    if files:
        for c in clips:
            (root / f"{c}.avi").write_bytes(b"")
    return path, root


def test_msvd_split_follows_sorted_clip_names(tmp_path):
    path, root = _msvd(tmp_path)
    got = {s: msvd_records(path, root, s, sizes=SIZES) for s in ("train", "val", "test")}
    assert [r["id"] for r in got["train"]] == MSVD_ORDER[:6]
    assert [r["id"] for r in got["val"]] == MSVD_ORDER[6:8]
    assert [r["id"] for r in got["test"]] == MSVD_ORDER[8:]
    rec = got["val"][0]
    assert rec["video"] == "Zz9_1_2.avi"
    assert rec["references"] == [f"Zz9_1_2 does thing {k}." for k in range(3)]
    assert rec["conversations"][1] == {"from": "gpt", "value": "Zz9_1_2 does thing 0."}


def test_msvd_needs_the_standard_count_or_a_mapping(tmp_path):
    path, root = _msvd(tmp_path)
    with pytest.raises(DataError, match=r"12 clips .* 1200/100/670 needs 1970"):
        msvd_records(path, root, "train")
    # the published mapping file decides when given: here the reverse of the sorted order
    mapping = tmp_path / "youtube_mapping.txt"
    mapping.write_text("".join(f"{c} vid{i}\n" for i, c in enumerate(reversed(MSVD_ORDER), 1)))
    assert [r["id"] for r in msvd_records(path, root, "val", mapping=mapping, sizes=SIZES)] == ["A_1_2", "9q_4_8"]
    mapping.write_text(mapping.read_text() + "zz_new_clip_1_2 vid13\n")
    with pytest.raises(DataError, match=r"1 mapped clip\(s\) have no captions .*zz_new_clip_1_2"):
        msvd_records(path, root, "val", mapping=mapping, sizes=SIZES)


def test_msvd_clips_without_video_can_be_left_out_before_the_split(tmp_path):
    path, root = _msvd(tmp_path, clips=MSVD_ORDER + ["0000_1_2"])
    (root / "0000_1_2.avi").unlink()
    with pytest.raises(DataError, match=r"1 video\(s\) not found .*0000_1_2"):
        msvd_records(path, root, "train", sizes=SIZES)
    assert [r["id"] for r in msvd_records(path, root, "train", sizes=SIZES, missing="skip")] == MSVD_ORDER[:6]


def test_msvd_csv_keeps_english_descriptions(tmp_path):
    csv_path = tmp_path / "video_corpus.csv"
    rows = ["VideoID,Start,End,WorkerID,Source,AnnotationTime,Language,Description"]
    for c in MSVD_ORDER:
        vid, start, end = c.rsplit("_", 2)
        rows += [f"{vid},{start},{end},1,clean,10,English,\"{c}, in English\"",
                 f"{vid},{start},{end},2,clean,12,German,{c} auf Deutsch"]
    csv_path.write_text("\n".join(rows) + "\n")
    _, root = _msvd(tmp_path)
    recs = msvd_records(csv_path, root, "test", sizes=SIZES)
    assert [r["id"] for r in recs] == MSVD_ORDER[8:]
    assert recs[0]["references"] == ["aB_0_1, in English"]
    csv_path.write_text("VideoID,Start,Description\nabc,1,x\n")
    with pytest.raises(DataError, match=r"video_corpus.csv: missing column\(s\) \['End'\]"):
        msvd_records(csv_path, root, "test", sizes=SIZES)


@pytest.mark.parametrize("line, match", [
    ("abc_1_2", r"AllVideoDescriptions.txt:4: expected '<clip> <caption>'"),
    ("abc_1_2 caf\xe9", r"AllVideoDescriptions.txt:4: not UTF-8 text \(byte 43"),
    ("abc a caption", r"AllVideoDescriptions.txt:4: clip name 'abc' is not <youtube id>_<start>_<end>"),
])
def test_msvd_bad_lines_name_the_file_and_line(tmp_path, line, match):
    path = tmp_path / "AllVideoDescriptions.txt"
    path.write_bytes(f"# comment\n\nxyz_1_2 fine caption\n{line}\n".encode("latin-1"))
    (tmp_path / "v").mkdir()
    with pytest.raises(DataError, match=match):
        msvd_records(path, tmp_path / "v", "train", sizes=(1, 0, 0))


# --- writing ---------------------------------------------------------------------------------------

def test_convert_writes_three_jsonl_files_the_conversation_reader_accepts(tmp_path):
    path, root = _msrvtt(tmp_path)
    out = convert_captions("msrvtt", path, root, tmp_path / "jsonl")
    assert {s: p.name for s, p in out.items()} == {"train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"}
    lines = {s: [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines()] for s, p in out.items()}
    assert lines["val"] == msrvtt_records(path, root, "val")
    assert [len(v) for v in lines.values()] == [7, 2, 3]
    from vision_ft.data import conversations
    if "videos" not in getattr(conversations.Conversation, "__dataclass_fields__", {}):
        pytest.skip("this conversation reader has no video support yet")
    convs, skipped = conversations.read_records(out["train"], image_root=root)
    assert not skipped and convs[3].videos == [root / "TrainValVideo" / "video3.mp4"]
    assert convs[3].references == [f"video3 caption {k}" for k in range(20)]


def test_write_jsonl_keeps_unicode_and_one_record_per_line(tmp_path):
    recs = [cd.caption_record("v1", "v1.mp4", ["un café, s'il vous plaît"]), cd.caption_record("v2", "v2.mp4", ["b"])]
    path = write_jsonl(recs, tmp_path / "sub" / "x.jsonl")
    text = path.read_text(encoding="utf-8")
    assert "café" in text and text.count("\n") == 2
    assert [json.loads(x) for x in text.splitlines()] == recs


def test_records_of_every_rank_are_gathered_once_each(monkeypatch):
    """Under DDP the test answers of all ranks are scored together (CIDEr's document frequencies are corpus
    level), and the samples a distributed sampler repeats to pad the last batch count once."""
    import torch.distributed as dist

    from vision_ft.tasks.gather import gather_records

    ranks = [[{"source": "f:1", "answer": "a"}, {"source": "f:3", "answer": "c"}],
             [{"source": "f:2", "answer": "b"}, {"source": "f:1", "answer": "a"}]]  # f:1 repeated as padding

    def fake_all_gather_object(parts, mine):
        parts[:] = ranks

    monkeypatch.setattr(dist, "all_gather_object", fake_all_gather_object)
    got = gather_records(2, ranks[0], "source")
    assert [r["source"] for r in got] == ["f:1", "f:3", "f:2"]
    assert gather_records(1, ranks[1], "source") is ranks[1]
