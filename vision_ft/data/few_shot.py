"""Few-shot splits following the CoOp protocol (Zhou et al., IJCV 2022).

``k`` training samples per class are drawn with a seed. The draw is written once to
a JSON file (key, label and SHA-1 of the content of every chosen sample, plus the
dataset identity) and reused by every later run with the same ``k`` and seed, so
results are reproducible and train/test leakage can be checked from the file alone.
On reuse the hashes are verified: changed data is an error, never a silent re-draw.

Works over any dataset given as ``labels`` + ``keys`` + ``hash_fn``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import DataError
from ..io import atomic_write_text

log = logging.getLogger("vision_ft")

FORMAT = "vision_ft.few_shot/v1"


def sample_indices(labels: np.ndarray, shots: int, seed: int, num_classes: int | None = None) -> list[int]:
    """Positions of ``shots`` samples per class, drawn with ``seed`` (sorted).

    Single-label ``labels`` are ``(N,)`` ints; multi-label ``(N, L)`` 0/1 rows, where each
    class gets ``shots`` positives not already chosen for an earlier class. Classes
    with fewer samples than ``shots`` contribute all they have (logged).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    multilabel = labels.ndim == 2
    n_classes = num_classes if num_classes is not None else (labels.shape[1] if multilabel else int(labels.max()) + 1)
    chosen: set[int] = set()
    short = []
    for c in range(n_classes):
        pool = np.flatnonzero(labels[:, c] > 0) if multilabel else np.flatnonzero(labels == c)
        pool = np.array([p for p in pool if p not in chosen], dtype=np.int64)
        take = min(shots, len(pool))
        if take < shots:
            short.append((c, len(pool)))
        if take:
            chosen.update(int(p) for p in rng.choice(pool, size=take, replace=False))
    if short:
        log.warning("few-shot: %d class(es) have fewer than %d training samples; all of them are used: %s",
                    len(short), shots, ", ".join(f"class {c}: {n}" for c, n in short))
    return sorted(chosen)


@dataclass
class FewShotSplit:
    """A ``shots``-per-class draw with ``seed`` of one dataset, stored in ``directory``.

    ``dataset`` identifies the data: ``name`` (used in the file name), ``class_names``
    (must match on reuse) and any other informative fields (type, source path).
    """

    shots: int
    seed: int
    dataset: dict = field(default_factory=dict)

    @property
    def filename(self) -> str:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(self.dataset.get("name", "data"))).strip("_") or "data"
        return f"fewshot_{name}_{self.shots}shot_seed{self.seed}.json"

    def resolve(self, directory: str | Path, labels: np.ndarray, keys: Sequence, hash_fn: Callable[[int], str],
                write: bool = True) -> tuple[list[int], Path]:
        """Positions of the few-shot samples among ``keys``, and the split file.

        Reads and verifies the file if it exists; otherwise draws and (if ``write``,
        i.e. on global rank 0) writes it. The draw is deterministic, so ranks that do
        not write get the same positions.
        """
        path = Path(directory) / self.filename
        if path.exists():
            return self._read(path, keys, hash_fn), path
        num_classes = len(self.dataset["class_names"]) if "class_names" in self.dataset else None
        positions = sample_indices(labels, self.shots, self.seed, num_classes)
        if write:
            self._write(path, positions, labels, keys, hash_fn)
            log.info("few-shot: wrote %d-shot split (seed %d, %d samples) to %s", self.shots, self.seed,
                     len(positions), path)
        return positions, path

    def _write(self, path: Path, positions: list[int], labels: np.ndarray, keys: Sequence,
               hash_fn: Callable[[int], str]) -> None:
        samples = []
        for p in positions:
            label = labels[p]
            samples.append({"key": keys[p], "label": label.astype(int).tolist() if np.ndim(label) else int(label),
                            "sha1": hash_fn(p)})
        doc = {"format": FORMAT, "shots": self.shots, "seed": self.seed, "dataset": self.dataset,
               "samples": samples}
        atomic_write_text(path, json.dumps(doc, indent=1))  # other ranks/processes never see half a file

    def _read(self, path: Path, keys: Sequence, hash_fn: Callable[[int], str]) -> list[int]:
        fix = f"Delete {path} to draw a new split, or set data.init_args.split_dir to another folder."
        try:
            doc = json.loads(path.read_text())
            entries = doc["samples"]
            if doc.get("format") != FORMAT:
                raise ValueError(f"format is {doc.get('format')!r}")
        except Exception as e:  # noqa: BLE001
            raise DataError(f"few-shot split file {path} is not a valid {FORMAT} file ({e}). {fix}") from e
        if doc.get("shots") != self.shots or doc.get("seed") != self.seed:
            raise DataError(f"few-shot split file {path} is for shots={doc.get('shots')} seed={doc.get('seed')}, "
                            f"not shots={self.shots} seed={self.seed}. {fix}")
        stored = doc.get("dataset", {})
        if "class_names" in self.dataset and stored.get("class_names") != self.dataset["class_names"]:
            raise DataError(f"few-shot split file {path} was written for classes {stored.get('class_names')}, "
                            f"the data has {self.dataset['class_names']}. {fix}")
        if stored.get("source") != self.dataset.get("source"):
            log.info("few-shot: %s was written for %s, now reading %s (content hashes are checked)",
                     path, stored.get("source"), self.dataset.get("source"))
        where = {k: i for i, k in enumerate(keys)}
        positions = []
        for entry in entries:
            key = entry["key"]
            if key not in where:
                raise DataError(f"few-shot split file {path} lists sample {key!r}, which is not in the training "
                                f"data (or was skipped as unreadable). {fix}")
            p = where[key]
            got = hash_fn(p)
            if got != entry["sha1"]:
                raise DataError(f"few-shot split file {path}: content hash of sample {key!r} is {got}, the file "
                                f"recorded {entry['sha1']}; the data changed since the split was written. "
                                f"Restore the data or: {fix}")
            positions.append(p)
        log.info("few-shot: reusing %d-shot split (seed %d, %d samples) from %s", self.shots, self.seed,
                 len(positions), path)
        return positions
