"""Patient-level splits: never the same patient in two of train / val / test.

Several images of one patient (slices, views, follow-up studies) are strongly correlated; an
image-level split lets a model recognise the patient rather than the finding and inflates test
scores. Here whole patients are assigned to a split:

- drawn with scikit-learn's ``StratifiedGroupKFold`` (groups = patients, strata = a label per
  patient) when every stratum has enough patients for the folds, else by a seeded shuffle of
  the patients (and the log says which);
- written to a JSON split file that lists the patients of each split, and reused whenever
  that file exists (hand-written files are welcome);
- checked on every load: a patient in two splits, or a patient in the data whom the file does
  not place, is a :class:`~vision_ft.errors.DataError` naming the file.

The fractions are met as folds: test is one fold of ``round(1 / test_fraction)`` over all
patients, validation one fold of ``round((1 - test) / val)`` over the rest.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...errors import ConfigError, DataError
from ...io import atomic_write_text

log = logging.getLogger("vision_ft")

SPLIT_NAMES = ("train", "val", "test")
FILE_KIND = "vision_ft patient split"


def check_fractions(fractions: Sequence[float], key: str = "data.init_args.split_fractions") -> tuple[float, ...]:
    try:
        train, val, test = (float(f) for f in fractions)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: three numbers [train, val, test] expected, got {fractions!r}") from e
    if train <= 0 or val <= 0 or test < 0 or abs(train + val + test - 1.0) > 1e-6:
        raise ConfigError(f"{key}: need train > 0, val > 0, test >= 0 summing to 1, got {[train, val, test]}")
    return train, val, test


def patient_strata(patients: Sequence[str], labels: np.ndarray) -> dict[str, int]:
    """One stratum per patient: the rarest class (single-label) or rarest positive finding (multi-label;
    ``-1`` = none) among the patient's samples, rarity counted over all samples; ties go to the smaller index.

    So a patient with one ``nodule`` slice among many ``normal`` ones counts as a nodule patient.
    """
    labels = np.asarray(labels)
    if labels.ndim == 1:
        positive = np.zeros((len(labels), int(labels.max()) + 1 if len(labels) else 1), dtype=bool)
        positive[np.arange(len(labels)), labels.astype(np.int64)] = True
    else:
        positive = np.nan_to_num(labels.astype(np.float64), nan=0.0) > 0
    frequency = positive.sum(0)
    out: dict[str, int] = {p: -1 for p in dict.fromkeys(patients)}
    for p, row in zip(patients, positive):
        for j in np.flatnonzero(row):
            if out[p] == -1 or (frequency[j], j) < (frequency[out[p]], out[p]):
                out[p] = int(j)
    return out


def _take_fold(patients: list[str], strata: dict[str, int], fraction: float, seed: int) -> tuple[list[str], bool]:
    """About ``fraction`` of ``patients`` as one fold; stratified when every stratum has a patient per fold."""
    k = max(2, int(round(1.0 / fraction)))
    if len(patients) < k:
        raise DataError(f"{len(patients)} patient(s) cannot be split into folds of {fraction:.0%}; add patients or "
                        f"change data.init_args.split_fractions")
    counts = Counter(strata[p] for p in patients)
    if len(counts) > 1 and min(counts.values()) >= k:
        from sklearn.model_selection import StratifiedGroupKFold

        groups = np.arange(len(patients))
        y = np.array([strata[p] for p in patients])
        folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        _, held = next(folds.split(np.zeros(len(patients)), y, groups))
        return [patients[i] for i in sorted(held)], True
    order = np.random.default_rng(seed).permutation(len(patients))
    n = max(1, int(round(len(patients) / k)))
    return [patients[i] for i in sorted(order[:n])], False


def draw_patient_split(patients: Sequence[str], labels: np.ndarray, fractions: Sequence[float] = (0.7, 0.15, 0.15),
                       seed: int = 0, stratify: bool = True) -> tuple[dict[str, list[str]], bool]:
    """``{split: sorted patient ids}`` and whether it was stratified."""
    _, val_f, test_f = check_fractions(fractions)
    unique = sorted(dict.fromkeys(str(p) for p in patients))
    strata = patient_strata([str(p) for p in patients], labels) if stratify else {p: 0 for p in unique}
    stratified = True
    test: list[str] = []
    if test_f > 0:
        test, stratified = _take_fold(unique, strata, test_f, seed)
    rest = [p for p in unique if p not in set(test)]
    val, s2 = _take_fold(rest, strata, val_f / (1.0 - test_f), seed + 1)
    train = [p for p in rest if p not in set(val)]
    if not train:
        raise DataError(f"no patient left for training from {len(unique)} patient(s); add patients")
    return {"train": train, "val": val, "test": test}, bool(stratify and stratified and s2)


def check_no_leakage(splits: dict[str, Sequence[str]], source: str) -> None:
    """A patient listed in two splits (or twice in one) is a :class:`DataError` naming ``source``."""
    seen: dict[str, str] = {}
    for split in SPLIT_NAMES:
        for p in splits.get(split, []):
            if p in seen:
                where = f"twice in {split}" if seen[p] == split else f"in both {seen[p]} and {split}"
                raise DataError(f"{source}: patient {p!r} is {where}; a patient belongs to exactly one split "
                                f"(patient-level split: no leakage between train, val and test)")
            seen[p] = split


def read_split_file(path: Path) -> dict[str, list[str]]:
    """The splits of a patient split file, checked for leakage."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} (data.init_args.split_file): not a readable JSON split file ({e})") from e
    splits = data.get("splits") if isinstance(data, dict) else None
    if not isinstance(splits, dict) or "train" not in splits or not set(splits) <= set(SPLIT_NAMES):
        raise DataError(f"{path} (data.init_args.split_file): expected {{\"splits\": {{\"train\": [patient ids], "
                        f"\"val\": [...], \"test\": [...]}}}}")
    for split, ids in splits.items():
        if not isinstance(ids, list) or not all(isinstance(p, (str, int)) for p in ids):
            raise DataError(f"{path}: splits.{split} must be a list of patient ids")
    out = {s: [str(p) for p in splits.get(s, [])] for s in SPLIT_NAMES}
    check_no_leakage(out, str(path))
    return out


def resolve_patient_split(split_file: Path, patients: Sequence[str], labels: np.ndarray, *,
                          fractions: Sequence[float], seed: int, stratify: bool, identity: dict,
                          write: bool = True) -> dict[str, list[str]]:
    """Reuse ``split_file`` if it exists (checked: no leakage, every patient placed), else draw and write it.

    ``patients`` and ``labels`` are per sample (several samples may share a patient).
    """
    present = sorted(dict.fromkeys(str(p) for p in patients))
    if split_file.is_file():
        splits = read_split_file(split_file)
        placed = {p for ids in splits.values() for p in ids}
        missing = [p for p in present if p not in placed]
        if missing:
            raise DataError(f"{split_file} (data.init_args.split_file) does not place {len(missing)} patient(s) of "
                            f"the data, e.g. {missing[:5]}; add them to a split, or delete the file to draw a new "
                            f"split")
        unused = placed - set(present)
        if unused:
            log.warning("%s lists %d patient(s) that the data does not have; ignored", split_file, len(unused))
        log.info("data: patient split reused from %s", split_file)
        return splits
    splits, stratified = draw_patient_split(patients, labels, fractions, seed, stratify)
    check_no_leakage(splits, "the drawn split")
    if write:
        payload = {"kind": FILE_KIND, **identity, "seed": seed, "fractions": list(fractions),
                   "stratified": stratified, "counts": {s: len(v) for s, v in splits.items()}, "splits": splits}
        atomic_write_text(split_file, json.dumps(payload, indent=1) + "\n")
    log.info("data: patient split drawn (%s; patients train/val/test %d/%d/%d) and written to %s",
             "stratified" if stratified else "not stratified", *(len(splits[s]) for s in SPLIT_NAMES), split_file)
    return splits
