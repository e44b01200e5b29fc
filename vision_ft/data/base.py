"""Base LightningDataModule for image classification, shared by every on-disk format.

A format subclass only reads label information in ``__init__`` (so ``num_classes``,
``class_names`` and ``multilabel`` exist before ``setup``: the CLI links them into
the model at instantiation) and implements :meth:`ClassificationData._raw_split`.
This base owns the rest: corrupt-image policy, carving a validation split, test
fallback, few-shot sampling and the dataloaders.

Batches are ``{"image": float32 (B,3,S,S) in [0,1], "label": int64 (B,) or float32 (B,L)}``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import ConfigError, DataError
from .few_shot import FewShotSplit
from .labelled_images import ImageDataset, Samples

log = logging.getLogger("vision_ft")

SPLITS = ("train", "val", "test")


class EpochShuffleSampler(DistributedSampler):
    """Random order that is a function of ``(seed, epoch)`` only, split across ranks, resumable mid-epoch.

    - Lightning calls ``set_epoch`` at the start of every training epoch, so a run resumed
      from a checkpoint sees the same order as an uninterrupted one (a plain seeded
      generator would restart its sequence). Without ``set_epoch`` the epoch advances on
      each pass.
    - With ``num_replicas > 1`` (DDP) rank ``r`` takes every ``num_replicas``-th index of the
      *same* permutation a single process would use (padded by wrap-around to equal
      length), so the union of the ranks' batch ``t`` is the single-process batch ``t`` of
      ``num_replicas`` times the size. Being a ``DistributedSampler``, Lightning keeps it
      instead of swapping in its own.
    - :meth:`resume_at` makes the next pass over that epoch skip the samples already
      trained on (mid-epoch checkpoints; see :class:`ResumableDataLoader`).
    """

    def __init__(self, data_source, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.data_source = data_source
        self.seed, self.epoch = int(seed), 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, samples_done: int) -> None:
        """The next pass over ``epoch`` starts after this rank's first ``samples_done`` samples."""
        self._resume = (int(epoch), int(samples_done))

    def permutation(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch``."""
        state = np.random.SeedSequence([self.seed, epoch]).generate_state(2, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
        order = torch.randperm(len(self.data_source), generator=generator).tolist()
        if self.num_replicas > 1:
            order += order[: self.total_size - len(order)]
            order = order[self.rank: self.total_size: self.num_replicas]
        return order

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        skip = 0
        if self._resume is not None and self._resume[0] == epoch:
            skip = self._resume[1]
        self._resume = None
        yield from self.permutation(epoch)[skip:]


class ResumableDataLoader(DataLoader):
    """A training loader Lightning can resume mid-epoch.

    Lightning stores the ``state_dict`` of "stateful" loaders in every checkpoint and hands
    it back on resume. The state is where the trainer was (epoch, batches done in it), read
    from the trainer's own progress counters rather than counted here, because Lightning
    pre-fetches a batch ahead of the one being trained on.
    """

    trainer = None  # set by the datamodule

    def state_dict(self) -> dict[str, int]:
        trainer = self.trainer
        if trainer is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": int(trainer.current_epoch), "batches": int(done), "batch_size": int(self.batch_size)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not state or not isinstance(self.sampler, EpochShuffleSampler):
            return
        if state["batch_size"] != self.batch_size:
            log.warning("data: resuming with batch size %d (checkpoint: %d): the interrupted epoch restarts "
                        "from its first batch", self.batch_size, state["batch_size"])
            return
        self.sampler.resume_at(state["epoch"], state["batches"] * self.batch_size)


class SplitLoaders:
    """The four dataloaders of a datamodule with ``dataset(split)``, ``batch_size``, ``seed``,
    ``num_workers`` and ``trainer``: training through :func:`train_loader` (epoch-seeded,
    rank-split, resumable), evaluation in order with its own generator. ``collate_fn``
    (a class attribute) batches items that the default collate cannot (boxes, clips)."""

    collate_fn = None

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.dataset(split)
        extra = {"collate_fn": type(self).collate_fn} if type(self).collate_fn is not None else {}
        if shuffle:
            return train_loader(dataset, self.batch_size, self.seed, self.num_workers, self.trainer, **extra)
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, generator=loader_generator(self.seed), **extra)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class ClassificationData(SplitLoaders, L.LightningDataModule):
    """Common options of every classification datamodule.

    Args:
        batch_size: samples per batch (per device).
        num_workers: dataloader worker processes.
        image_size: every image is resized to ``image_size × image_size``.
        augment: random horizontal flip on the training split.
        shots: few-shot training with ``shots`` samples per class (CoOp protocol);
            ``None`` uses the whole training split.
        seed: seed of the few-shot draw, the validation carve and the train shuffle.
        split_dir: folder of the few-shot split file; default: the trainer's
            ``log_dir`` when a trainer is attached, else ``./splits``. Set it to reuse
            a split across runs.
        on_corrupt: ``skip`` unreadable images (count and paths logged, kept in
            ``self.skipped``) or ``error`` on the first one.
        class_names: display names of the classes (length ``num_classes``); for CSV
            manifests they also fix the label order.
        val_fraction: share of the training split held out for validation when the
            data has no validation split.
    """

    def __init__(
        self,
        batch_size: int = 32,
        num_workers: int = 0,
        image_size: int = 224,
        augment: bool = False,
        shots: int | None = None,
        seed: int = 0,
        split_dir: str | None = None,
        on_corrupt: Literal["skip", "error"] = "skip",
        class_names: list[str] | None = None,
        val_fraction: float = 0.1,
    ):
        super().__init__()
        for key, value, low in (("batch_size", batch_size, 1), ("image_size", image_size, 1),
                                ("num_workers", num_workers, 0)):
            if int(value) < low:
                raise ConfigError(f"data.init_args.{key} must be >= {low}, got {value}")
        if shots is not None and shots < 1:
            raise ConfigError(f"data.init_args.shots must be a positive number of samples per class or null, got {shots}")
        if on_corrupt not in ("skip", "error"):
            raise ConfigError(f"data.init_args.on_corrupt must be 'skip' or 'error', got {on_corrupt!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.init_args.val_fraction must be in (0, 1), got {val_fraction}")
        self.batch_size, self.num_workers, self.image_size = int(batch_size), int(num_workers), int(image_size)
        self.augment, self.shots, self.seed = augment, shots, int(seed)
        self.split_dir, self.on_corrupt, self.val_fraction = split_dir, on_corrupt, float(val_fraction)
        self._given_names = list(class_names) if class_names is not None else None
        self.num_classes: int = 0
        self.class_names: list[str] = []
        self.multilabel: bool = False
        self.skipped: list[str] = []
        self.few_shot_file: Path | None = None
        self._cache: dict[str, Samples] = {}

    # ---- for subclasses -------------------------------------------------------------
    def _set_classes(self, num_classes: int, default_names: list[str] | None = None, multilabel: bool = False) -> None:
        """Fix ``num_classes`` / ``class_names`` / ``multilabel``; given ``class_names`` must fit."""
        if num_classes < 1:
            raise DataError("the data has no classes")
        if self._given_names is not None and len(self._given_names) != num_classes:
            raise ConfigError(f"data.init_args.class_names has {len(self._given_names)} names but the data has "
                              f"{num_classes} classes")
        self.num_classes = int(num_classes)
        self.class_names = self._given_names or list(default_names or [str(i) for i in range(num_classes)])
        self.multilabel = bool(multilabel)

    def _raw_split(self, split: str) -> Samples | None:
        """The split as stored (``None`` if the data has none). Called once per split, at setup."""
        raise NotImplementedError

    def _identity(self) -> dict:
        """What the data is, for few-shot split files: ``name`` and ``source`` at least."""
        return {"name": type(self).__name__, "source": ""}

    def input_transform(self) -> dict | None:
        """What this data does to a decoded image before the kit scales it to ``[0, 1]`` and resizes it
        (a pack's sigma clip and stretch...), as ``{"class_path": ..., "init_args": {...}}`` of a callable
        ``array -> array``. The task records it with the run (``adapter.json``, checkpoints), so inference
        (``load_adapter(run).predict_images``, ``predict --images``) feeds the model what training did.
        An optional ``"readers": {".fits": "package.module.function"}`` names, by file suffix, how to decode
        files PIL cannot read (``function(path) -> array``, or ``{"class_path", "init_args"}`` of a callable
        reader configured like the data, e.g. a DICOM window); a spec may hold readers alone. ``None``
        (default): nothing beyond decoding."""
        return None

    # ---- splits ---------------------------------------------------------------------
    def _checked(self, split: str) -> Samples | None:
        samples = self._raw_split(split)
        if samples is None:
            return None
        bad = samples.unreadable()
        if not bad:
            return samples
        paths = [samples.describe(i) for i in bad]
        if self.on_corrupt == "error":
            first = next(iter(bad))
            raise DataError(f"unreadable image {samples.describe(first)} ({bad[first]}). Fix or remove it, or set "
                            f"data.init_args.on_corrupt=skip to skip unreadable images.")
        self.skipped.extend(paths)
        log.warning("skipped %d unreadable image(s) in the %s split (data.init_args.on_corrupt=skip):\n  %s",
                    len(paths), split, "\n  ".join(paths))
        return samples.subset([i for i in range(len(samples)) if i not in bad])

    def _split(self, split: str) -> Samples:
        if split in self._cache:
            return self._cache[split]
        if split in ("pool", "val"):
            pool, val = self._checked("train"), self._checked("val")
            if pool is None or len(pool) == 0:
                raise DataError("the training split has no readable images")
            if val is None:
                pool, val = self._carve(pool)
            self._cache.update(pool=pool, val=val)
        elif split == "train":
            pool = self._split("pool")
            self._cache["train"] = self._few_shot(pool) if self.shots else pool
        elif split == "test":
            test = self._checked("test")
            if test is None:
                log.warning("no test split in the data: testing and predicting use the validation split")
                test = self._split("val")
            self._cache["test"] = test
        return self._cache[split]

    def _carve(self, pool: Samples) -> tuple[Samples, Samples]:
        n = len(pool)
        n_val = max(1, int(round(n * self.val_fraction)))
        if n - n_val < 1:
            raise DataError(f"cannot hold out a validation split from {n} training image(s); add a validation split")
        order = np.random.default_rng(self.seed).permutation(n)
        log.info("no validation split in the data: holding out %d of %d training images (val_fraction=%s, seed=%d)",
                 n_val, n, self.val_fraction, self.seed)
        return pool.subset(sorted(order[n_val:].tolist())), pool.subset(sorted(order[:n_val].tolist()))

    def _split_directory(self) -> Path:
        if self.split_dir:
            return Path(self.split_dir)
        log_dir = getattr(self.trainer, "log_dir", None) if self.trainer is not None else None
        return Path(log_dir) if log_dir else Path("splits")

    def _few_shot(self, pool: Samples) -> Samples:
        identity = {**self._identity(), "split": "train", "num_classes": self.num_classes,
                    "class_names": self.class_names, "multilabel": self.multilabel}
        write = self.trainer.is_global_zero if self.trainer is not None else True
        positions, self.few_shot_file = FewShotSplit(self.shots, self.seed, identity).resolve(
            self._split_directory(), pool.labels, pool.keys, pool.sha1, write=write)
        return pool.subset(positions)

    # ---- Lightning hooks --------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self._split("train")
        if stage in (None, "fit", "validate"):
            self._split("val")
        if stage in (None, "test", "predict"):
            self._split("test")

    def dataset(self, split: Literal["train", "val", "test"]) -> ImageDataset:
        """The torch dataset of a split (``train`` is the few-shot subset when ``shots`` is set)."""
        return ImageDataset(self._split(split), self.image_size, flip=self.augment and split == "train")



def train_loader(dataset, batch_size: int, seed: int, num_workers: int = 0, trainer=None, **kwargs) -> DataLoader:
    """The kit's training loader for any map-style dataset: epoch-seeded shuffle, split across
    the trainer's ranks, resumable mid-epoch. Datamodules of every task use it."""
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = EpochShuffleSampler(dataset, seed, num_replicas=world, rank=rank)
    kwargs.setdefault("generator", loader_generator(seed))
    loader = ResumableDataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                 persistent_workers=num_workers > 0, **kwargs)
    loader.trainer = trainer
    return loader


def loader_generator(seed: int) -> torch.Generator:
    """A DataLoader's own generator: without one, every ``iter(loader)`` draws a worker base seed
    from the global torch RNG, shifting the dropout/augmentation stream by where a run was
    resumed. With it, the global stream depends on the training steps alone."""
    return torch.Generator().manual_seed(int(seed) + 104729)
