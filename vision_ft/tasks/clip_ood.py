"""Few-shot OOD detection with CLIP: ID accuracy plus OOD scores, FPR95 / AUROC / AUPR-In per OOD set.

Training and validation are those of :class:`CLIPClassificationTask` on the in-distribution (ID)
data (few-shot, cross-entropy on the text head), except that a method may bring its own loss.
The test runs on :class:`vision_ft.data.ood.OODData`'s tagged loader (ID test split + OOD sets)
and reports, besides ``test/acc`` (ID accuracy), for every score and OOD set:
``test/<score>/<set>/{fpr95,auroc,aupr}`` and their mean ``test/<score>/avg/...``
(definitions and the FPR95 threshold rule: :mod:`vision_ft.metrics.ood`; higher score = more
ID, ID is the positive class, ``aupr`` is AUPR-In).

Scores:

- ``mcm`` (always): Maximum Concept Matching (Ming et al., "Delving into Out-of-Distribution
  Detection with Vision-Language Representations", NeurIPS 2022, Eq. 4):
  ``max_k softmax_k(cos(f_image, f_text(k)) / T)`` over the ID classes' text features, with
  ``T = mcm_temperature`` applied to the *raw cosine similarities* (not CLIP's logit scale of
  100); the official code (deeplearning-wisc/MCM ``eval_ood_detection.py``) uses ``T = 1``, the
  default here. The text features are the task's head: the prompt-template ensemble, or the
  method's ``class_text_features`` (CoOp-style learned prompts). All ID classes are the concepts,
  also with ``base_to_novel`` / ``held_out_classes``.
- method scores: a method whose ``ood_scores`` returns scores adds its own (Local-Prompt: ``regional`` and
  ``mcm+regional``). A method returning ``mcm`` replaces the task's (Local-Prompt computes it on its
  global prompts, which may be a loaded CoOp context); the log says so.

Method hooks (declared on :class:`~vision_ft.methods.Method` with their defaults; the task calls
them on every method and falls back to its own behaviour on the default):

``training_loss(task, images, labels) -> Tensor | None`` (called by the parent task)
    Replaces the cross-entropy of a training step. ``images``: (B, 3, H, W) in [0, 1] (not yet
    normalised: use ``task.backbone.preprocess``); ``labels``: (B,) indices into ``task.seen``
    (all ID classes unless classes are held out). Return a scalar; the task still adds the
    method's ``regularizer`` terms, checks finiteness and logs ``train/loss``. Default ``None``.

``ood_scores(task, images) -> dict[str, Tensor]`` (default ``{}``)
    Called in ``test_step`` / ``predict_step`` (eval mode, no grad) on every batch, ID and OOD
    alike. ``images`` as above. Return ``{name: (B,) tensor}``, higher = more in-distribution.
    Names: letters, digits and ``_ . + -`` (they become metric keys, ``test/<name>/<set>/fpr95``);
    a returned ``mcm`` replaces the task's. Useful task helpers:
    ``task.image_features(images)`` (normalised global image features),
    ``task.text_head(list(range(task.num_classes)))`` (normalised ID class text features, cached),
    ``task.mcm(cosine)`` (the MCM score from (B, K) cosine similarities),
    ``task.backbone.features(task.backbone.preprocess(images))`` (pooled + token features of the
    visual tower, for regional scores).

``id_logits(task, images) -> Tensor | None`` (default ``None``)
    The method's own ID classifier at test: (B, len(task.seen)) class scores whose argmax is the
    prediction (Local-Prompt's global x regional classifier); ``test/acc`` then uses it. On ``None``
    (or with held-out classes, whose bookkeeping is the parent's) the text head's logits are used.

Artifacts (rank 0, not under ``fast_dev_run``): ``ood_metrics.json`` (every score x set, the
FPR95 operating points, sample counts), ``ood_roc_<score>.png`` and ``ood_hist_<score>.png`` in
the run directory, and the ``test/`` metrics added to ``adapter.json`` when the run has one
(``fit``; a bare ``test`` of the zero-shot model writes the JSON and plots only).
Scores are gathered across ranks before the metrics are computed (:class:`OODScores`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from ..backbones import Backbone
from ..errors import ConfigError
from ..export import atomic_write_text
from ..methods import Method
from ..metrics.ood import OODScores, evaluate_ood, flatten
from .clip_classification import CLIPClassificationTask

log = logging.getLogger("vision_ft")

_SCORE_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
OOD_METRICS_FILE = "ood_metrics.json"


class CLIPOODTask(CLIPClassificationTask):
    """CLIP few-shot classification with OOD detection at test (MCM + method scores).

    Args:
        mcm_temperature: ``T`` of the MCM softmax over cosine similarities (MCM's default 1).
        (every other argument: :class:`CLIPClassificationTask`)
    """

    def __init__(
        self,
        backbone: Backbone,
        method: Method | str = "clip_lora",
        num_classes: int = 2,
        class_names: list[str] | None = None,
        multilabel: bool = False,
        templates: list[str] = ["a photo of a {}."],  # noqa: B006 - jsonargparse needs a plain list default
        base_to_novel: bool = False,
        held_out_classes: list[str] | None = None,
        mcm_temperature: float = 1.0,
        lr: float = 2e-4,
        weight_decay: float = 0.01,
        head_lr: float | None = None,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        warmup_fraction: float = 0.0,
        min_lr_ratio: float = 0.0,
        ema_decay: float = 0.0,
        on_nonfinite: Literal["stop", "skip"] = "stop",
    ) -> None:
        if not float(mcm_temperature) > 0:
            raise ConfigError(f"model.init_args.mcm_temperature must be > 0, got {mcm_temperature}")
        super().__init__(backbone, method, num_classes=num_classes, class_names=class_names, multilabel=multilabel,
                         templates=templates, base_to_novel=base_to_novel, held_out_classes=held_out_classes,
                         lr=lr, weight_decay=weight_decay, head_lr=head_lr, optimizer=optimizer,
                         warmup_fraction=warmup_fraction, min_lr_ratio=min_lr_ratio, ema_decay=ema_decay,
                         on_nonfinite=on_nonfinite)
        self.mcm_temperature = float(mcm_temperature)
        self.ood_collector = OODScores()
        self.ood_results: dict[str, Any] | None = None
        self._ood_names: list[str] = []
        self._mcm_replaced_logged = False

    # --- scores ------------------------------------------------------------------------------
    def mcm(self, cosine: torch.Tensor) -> torch.Tensor:
        """MCM score (B,) from cosine similarities (B, K) to the ID class text features."""
        return (cosine / self.mcm_temperature).softmax(dim=-1).amax(dim=-1)

    def _cosine(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_features(images) @ self.text_head(list(range(self.num_classes))).T

    def ood_scores(self, images: torch.Tensor, cosine: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"mcm": ..., **method scores}``, each (B,), higher = more in-distribution."""
        cosine = self._cosine(images) if cosine is None else cosine
        scores = {"mcm": self.mcm(cosine).float()}
        extra = self.method.ood_scores(self, images)
        where = f"{type(self.method).__name__}.ood_scores"
        if not isinstance(extra, dict):
            raise TypeError(f"{where} must return a dict of name -> (B,) tensor, got {type(extra).__name__}")
        for name, value in extra.items():
            if not isinstance(name, str) or not _SCORE_NAME.match(name):
                raise ValueError(f"{where}: score name {name!r} is not allowed (letters, digits, '_', '.', '+', '-')")
            if not isinstance(value, torch.Tensor) or value.shape != (len(images),):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{where}: score {name!r} must be a ({len(images)},) tensor, got {shape}")
            scores[name] = value.detach().float()
        if "mcm" in extra and not self._mcm_replaced_logged:
            rank_zero_info(f"[vision_ft] OOD score 'mcm' comes from {where} (it replaces the task's text-head MCM)")
            self._mcm_replaced_logged = True
        return scores

    # --- test ----------------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        names = getattr(self.trainer.datamodule, "ood_names", None)
        if not names:
            raise ConfigError("CLIPOODTask tests on in-distribution + OOD data: set data.class_path to "
                              "vision_ft.data.ood.OODData (init_args: in_distribution, ood)")
        self._ood_names = list(names)
        self.ood_collector.reset()
        self.ood_results = None

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if "ood_set" not in batch or "index" not in batch:
            raise ConfigError("CLIPOODTask needs the tagged test batches of vision_ft.data.ood.OODData "
                              "(keys ood_set, index); set data.class_path accordingly")
        images, source = batch["image"], batch["ood_set"]
        is_id = source == 0
        cosine = self._cosine(images)
        if is_id.any():
            if self.held:  # base / novel / retention bookkeeping as in the parent
                super().test_step({"image": images[is_id], "label": batch["label"][is_id]}, batch_idx)
            else:
                self.test_acc.update(self._id_logits(images[is_id], cosine[is_id]), batch["label"][is_id])
                self.log("test/acc", self.test_acc)
        self.ood_collector.update(batch["index"], source, self.ood_scores(images, cosine))

    def _id_logits(self, images: torch.Tensor, cosine: torch.Tensor) -> torch.Tensor:
        """ID class scores (B, K): the method's ``id_logits`` unless it returns ``None``, else the text head's."""
        logits = self.method.id_logits(self, images)
        if logits is None:
            return self.backbone.logit_scale().float() * cosine
        if not isinstance(logits, torch.Tensor) or logits.shape != (len(images), len(self.seen)):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"{type(self.method).__name__}.id_logits must return a ({len(images)}, {len(self.seen)}) "
                             f"tensor, got {shape}")
        return logits.float()

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if not self.ood_collector.update_called:
            log.warning("OOD detection: the test saw no samples; no OOD metrics")
            return
        gathered = self.ood_collector.compute()  # a collective under DDP: every rank gets every sample
        self.ood_collector.reset()
        source = gathered["ood_set"].cpu().numpy()
        present = [k for k in range(1, len(self._ood_names) + 1) if (source == k).any()]
        missing = [self._ood_names[k - 1] for k in range(1, len(self._ood_names) + 1) if k not in present]
        if not (source == 0).any() or not present:
            log.warning("OOD detection: the test saw %s; no OOD metrics (limit_test_batches too small?)",
                        "no in-distribution samples" if not (source == 0).any() else "no OOD samples")
            return
        if missing:
            log.warning("OOD detection: the test saw no samples of OOD set(s) %s (limit_test_batches?); they are "
                        "left out of the results and of the averages", missing)
        remap = np.zeros(len(self._ood_names) + 1, dtype=np.int64)
        for new, k in enumerate(present, start=1):
            remap[k] = new
        keep = (source == 0) | np.isin(source, present)
        names = [self._ood_names[k - 1] for k in present]
        scores = {n: v.cpu().double().numpy()[keep] for n, v in gathered["scores"].items()}
        source = remap[source[keep]]
        results = evaluate_ood(scores, source, names)
        # every rank holds the same gathered results: a max over ranks syncs without changing a bit
        self.log_dict(flatten(results, "test/"), sync_dist=True, reduce_fx="max")
        self.ood_results = {"results": results, "scores": scores, "ood_set": source, "set_names": names,
                            "missing": missing}

    def on_test_end(self) -> None:
        if self.trainer.is_global_zero and self.ood_results is not None:
            if self.trainer.fast_dev_run:
                rank_zero_info("[vision_ft] fast_dev_run: OOD metrics logged, no ood_metrics.json or plots written")
            else:
                self.write_ood_artifacts(self.run_dir)
        super().on_test_end()

    def write_ood_artifacts(self, run_dir: Path) -> Path:
        """``ood_metrics.json`` and the ROC / histogram PNGs of every score into ``run_dir``."""
        from ..plots_ood import plot_ood_histograms, plot_ood_roc

        res = self.ood_results
        assert res is not None, "write_ood_artifacts before a test epoch"
        source, names = res["ood_set"], res["set_names"]
        dm = self.trainer.datamodule if self._trainer is not None else None
        doc = {
            "convention": "score higher = in-distribution; ID is the positive class; aupr = AUPR-In; "
                          "fpr95 = fraction of OOD with score >= t*, t* = observed score whose ID TPR is closest to "
                          "0.95, ties to the lowest threshold (official MCM evaluation rule)",
            "method": self.method.name,
            "mcm_temperature": self.mcm_temperature,
            "mcm_source": f"{self.method.name}.ood_scores" if self._mcm_replaced_logged else "task text head",
            "n_id": int((source == 0).sum()),
            "ood_sets": {n: {"folder": getattr(dm, "ood", {}).get(n), "n": int((source == k).sum())}
                         for k, n in enumerate(names, start=1)},
            "missing_ood_sets": res["missing"],
            "synthetic_ood": bool(getattr(dm, "synthetic", False)),
            "id_metrics": {k: v for k, v in self.final_metrics("test/").items() if k.count("/") == 1},
            "scores": res["results"],
        }
        run_dir = Path(run_dir)
        atomic_write_text(run_dir / OOD_METRICS_FILE, json.dumps(doc, indent=2) + "\n")
        for score, values in res["scores"].items():
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", score)
            ood = {n: values[source == k] for k, n in enumerate(names, start=1)}
            plot_ood_roc(values[source == 0], ood, run_dir / f"ood_roc_{safe}.png", score, res["results"][score])
            plot_ood_histograms(values[source == 0], ood, run_dir / f"ood_hist_{safe}.png", score,
                                res["results"][score])
        summary = ", ".join(f"{s}: FPR95 {r['avg']['fpr95']:.4f} AUROC {r['avg']['auroc']:.4f}"
                            for s, r in res["results"].items())
        rank_zero_info(f"[vision_ft] OOD detection (mean over {len(names)} OOD sets) {summary}; "
                       f"{OOD_METRICS_FILE} and plots in {run_dir}")
        return run_dir / OOD_METRICS_FILE

    # --- predict -------------------------------------------------------------------------------
    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        images = batch["image"]
        cosine = self._cosine(images)
        probs = self._id_logits(images, cosine).softmax(-1) if not self.held else \
            (self.backbone.logit_scale().float() * cosine).softmax(-1)
        out: dict[str, Any] = {"probs": probs, "pred": probs.argmax(-1), "scores": self.ood_scores(images, cosine)}
        for key in ("ood_set", "index"):
            if key in batch:
                out[key] = batch[key]
        return out

    def task_metadata(self) -> dict[str, Any]:
        meta = super().task_metadata()
        meta["task_args"] = {**meta["task_args"], "mcm_temperature": self.mcm_temperature}
        return meta
