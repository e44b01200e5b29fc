"""``bench params``: trainable parameters per method, head excluded and included.

Next to each count stands the paper's table value where the method declares one
(``Method.paper_parameters``: ViT-B/16, ImageNet-21k tables); a count is compared with it
only on ``vit_base_patch16_224``, at the precision the paper prints.
"""

from __future__ import annotations

from typing import Any, Callable

from ..methods import Method
from .common import (MethodSpec, PreparedCache, Settings, frozen_base_parameters,
                     head_parameters, input_size, make_backbone, trainable_backbone, try_build)

PAPER_BACKBONE = "vit_base_patch16_224"


def paper_value(spec: MethodSpec, method: Method) -> dict[str, Any] | None:
    """The paper's table value for the method's config (declared by the method, ``Method.paper_parameters``)."""
    return method.paper_parameters()


def count_row(spec: MethodSpec, task: Any, settings: Settings, base_params: int) -> dict[str, Any]:
    """The counts of one built (and prepared) task; ``on_train_end`` is run for the deployed count."""
    method = task.method
    trainable = trainable_backbone(task)
    head = head_parameters(task)
    row: dict[str, Any] = {
        "method": spec.label, "name": spec.name, "class_path": f"{type(method).__module__}.{type(method).__qualname__}",
        "config": method.config(), "trainable_params": trainable, "head_params": head,
        "trainable_with_head": trainable + head, "percent_of_base": 100.0 * trainable / base_params,
        "frozen_base_params": frozen_base_parameters(task), "mergeable": type(method).mergeable,
        "requires_data": type(method).requires_data,
        "nominal_params": method.nominal_trainable_parameters(task.backbone),
    }
    method.on_train_end(task)  # e.g. MoSA folds its experts into one adapter: what is deployed
    row["deployed_params"] = trainable_backbone(task)
    paper = paper_value(spec, method)
    row["paper"] = paper
    if paper is not None and settings.backbone == PAPER_BACKBONE and not settings.image_size:
        ours = row["deployed_params"] if paper["compare"] == "deployed" else trainable
        row["paper_match"] = abs(ours - paper["value"]) <= paper["precision"] / 2
    else:
        row["paper_match"] = None
    return row


def run_params(specs: list[MethodSpec], settings: Settings, cache: PreparedCache,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    base_params = sum(p.numel() for p in make_backbone(settings).model.parameters())
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for spec in specs:
        task = try_build(spec, settings, cache, skipped, log)
        if task is None:
            continue
        rows.append(count_row(spec, task, settings, base_params))
        log(f"  params {spec.label}: {rows[-1]['trainable_params']:,}")
        del task
    return {"base_params": base_params, "image_size": input_size(settings), "rows": rows, "skipped": skipped}
