"""``bench params``: trainable parameters per method, head excluded and included.

Next to each count stands the paper's table value where the method cards of the
project give one (ViT-B/16, ImageNet-21k tables); a count is compared with it only
on ``vit_base_patch16_224``, at the precision the paper prints.
"""

from __future__ import annotations

from typing import Any, Callable

from ..methods import Method
from .common import (MethodSpec, PreparedCache, Settings, frozen_base_parameters,
                     head_parameters, input_size, make_backbone, trainable_backbone, try_build)

PAPER_BACKBONE = "vit_base_patch16_224"


def _mosa(m: Method) -> dict[str, Any] | None:
    values = {64: (1_208_064, 1_000, "1.208M"), 16: (322_752, 1_000, "0.323M")}
    if getattr(m, "experts", None) is None or m.bottleneck not in values:
        return None
    v, prec, text = values[m.bottleneck]
    return {"value": v, "precision": prec, "text": f"{text} after folding (b={m.bottleneck})", "compare": "deployed",
            "source": "MoSA (Theia-4869/MoSA): the folded adapter equals AdaptFormer with its LN"}


def _pego(m: Method) -> dict[str, Any] | None:
    values = {2: (295_000, 1_000, "0.295M"), 4: (590_000, 10_000, "0.59M")}
    if m.r != 4 or sorted(m.targets) != ["q", "v"] or m.num_modules not in values:
        return None
    v, prec, text = values[m.num_modules]
    return {"value": v, "precision": prec, "text": f"{text} (N={m.num_modules}, r=4, q+v) + head",
            "compare": "trainable", "source": "PEGO (Hu et al., ECCV 2024)"}


def _spt(m: Method) -> dict[str, Any] | None:
    return {"value": m.budget, "precision": int(0.02 * m.budget) * 2, "text": f"= budget {m.budget:,} "
            "(paper sweeps 0.2M-1.0M per task)", "compare": "trainable",
            "source": "SPT (He et al., ICCV 2023): the budget is a per-task hyper-parameter"}


#: method name -> the paper's table value for its config (None where the config is not the paper's)
PAPER_VALUES: dict[str, Callable[[Method], dict[str, Any] | None]] = {
    "full": lambda m: {"value": 85_800_000, "precision": 100_000, "text": "85.8M", "compare": "trainable",
                       "source": "full fine-tuning row of the VTAB-1k tables (SSF, SPT papers)"},
    "linear": lambda m: {"value": 0, "precision": 1, "text": "0 (head only)", "compare": "trainable",
                         "source": "linear probe row"},
    "ssf": lambda m: {"value": 205_824, "precision": 1, "text": "205,824 (0.24M VTAB / 0.39M FGVC with heads)",
                      "compare": "trainable", "source": "SSF (Lian et al., NeurIPS 2022): 2*8448*12 + 2*1536"},
    "mosa": _mosa,
    "pego": _pego,
    "spt_lora": _spt,
    "spt_adapter": _spt,
}


def paper_value(spec: MethodSpec, method: Method) -> dict[str, Any] | None:
    fn = PAPER_VALUES.get(spec.name)
    return fn(method) if fn is not None else None


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
