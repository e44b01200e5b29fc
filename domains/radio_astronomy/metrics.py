"""What the pack reports, and the classical Fanaroff-Riley ratio.

Training and testing go through the kit's :class:`~vision_ft.tasks.ImageClassificationTask`,
which logs, for FR I vs FR II (or any convention's classes):

- ``test/acc`` (accuracy), ``test/f1`` (macro F1), ``test/auroc`` (macro one-vs-rest AUROC),
- ``test/recall_<class>`` (per-class recall, e.g. ``test/recall_FRI``, ``test/recall_FRII``),
- ``confusion_matrix.png`` in the run directory; the numbers go to ``adapter.json``.

:func:`fr_metrics` builds the same torchmetrics collection for use outside a run
(e.g. to score a catalogue of predictions), and :func:`fr_ratio` computes the
Fanaroff & Riley (1974) ratio that defines the classes on an image.
"""

from __future__ import annotations

import numpy as np

#: metric keys the task writes for the pack's classes (``<class>`` is each class name)
REPORTED_METRICS = ("test/acc", "test/f1", "test/auroc", "test/recall_<class>", "confusion_matrix.png")


def fr_metrics(num_classes: int = 2, prefix: str = ""):
    """torchmetrics collection: accuracy, per-class recall, macro AUROC, confusion matrix.

    ``update(probs, target)`` with probabilities ``(N, C)`` and integer targets ``(N,)``.
    ``compute()["recall"]`` is a ``(C,)`` tensor in class order; ``["confusion"]`` a ``(C, C)``
    count matrix (rows: true class).
    """
    from torchmetrics import MetricCollection
    from torchmetrics.classification import (
        MulticlassAccuracy, MulticlassAUROC, MulticlassConfusionMatrix, MulticlassRecall,
    )

    return MetricCollection({
        "acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
        "recall": MulticlassRecall(num_classes=num_classes, average=None),
        "auroc": MulticlassAUROC(num_classes=num_classes, average="macro"),
        "confusion": MulticlassConfusionMatrix(num_classes=num_classes),
    }, prefix=prefix)


def fr_ratio(image: np.ndarray, threshold: float = 0.0, core_radius: float = 6.0, min_pixels: int = 5,
             centre: tuple[float, float] | None = None) -> float:
    """Fanaroff & Riley (1974) ratio: distance between the brightest points on either side of the
    core divided by the total extent of the source. FR I below 0.5, FR II above.

    Emission is every pixel above ``threshold`` (0 for MiraBest-style images whose
    background is already zeroed), minus islands smaller than ``min_pixels`` (noise). The
    source axis is the principal axis of the emission's brightness-weighted second
    moments through ``centre`` (default: the image centre, where cutouts put the host);
    pixels within ``core_radius`` of it are the core, not a "brightest point". A side
    without emission counts as the core. Returns NaN when there is no emission.
    """
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float64)
    mask = np.isfinite(img) & (img > threshold)
    labels, n = ndimage.label(mask)
    if n:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
        mask &= np.isin(labels, np.flatnonzero(sizes >= min_pixels) + 1)
    if not mask.any():
        return float("nan")
    cy, cx = centre if centre is not None else ((img.shape[0] - 1) / 2.0, (img.shape[1] - 1) / 2.0)
    ys, xs = np.nonzero(mask)
    w = img[ys, xs]
    dy, dx = ys - cy, xs - cx
    cov = np.array([[np.sum(w * dx * dx), np.sum(w * dx * dy)], [np.sum(w * dx * dy), np.sum(w * dy * dy)]])
    _, vecs = np.linalg.eigh(cov)
    axis = vecs[:, -1]  # major axis (x, y)
    proj = dx * axis[0] + dy * axis[1]
    extent = proj.max() - proj.min()
    if extent <= 0:
        return float("nan")
    outside = np.hypot(dy, dx) > core_radius
    points = []
    for side in (proj > 0, proj < 0):
        sel = side & outside
        points.append(proj[sel][np.argmax(w[sel])] if sel.any() else 0.0)
    return float(abs(points[0] - points[1]) / extent)
