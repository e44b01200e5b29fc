"""WiSE-FT: weight-space ensembles of the zero-shot and the fine-tuned model.

Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022, Eq. 1:
``theta_alpha = (1 - alpha) * theta_zero_shot + alpha * theta_fine_tuned``, element-wise over every
floating-point tensor of the model. ``alpha = 0`` is the zero-shot model, ``alpha = 1`` the fine-tuned
one; intermediate values trade target accuracy for robustness under distribution shift (the paper
sweeps alpha in steps of 0.1 and reports alpha = 0.5 as a good default without held-out tuning).

How the kit applies it (``python -m vision_ft export RUN_DIR --interpolate ALPHA [ALPHA ...] --out OUT``):

- The fine-tuned endpoint is the run's model with its method merged into the weights (so only
  mergeable methods and full fine-tuning qualify: CoOp's prompts or Local-Prompt's local prompts are
  not weights of the model and have no zero-shot counterpart to interpolate with).
- The zero-shot endpoint is the run's base model rebuilt from ``adapter.json`` (the same weights,
  checked by fingerprint; ``--checkpoint`` points at them offline), i.e. the model before training.
- Only CLIP tasks have a zero-shot model (their head is derived from the text tower: interpolating
  both towers' weights interpolates the classifier with them, and ``class_text_features`` of each
  export is recomputed from the interpolated text tower). A task with a trained linear head has no
  zero-shot endpoint for that head; it is refused with a clear error.
- Integer and boolean tensors (position ids, counters) are not interpolated: they are taken from
  the fine-tuned model (they must agree with the zero-shot model; a difference is an error).
- ``torch.lerp`` is exact at both ends (it computes ``b - (b - a)(1 - w)`` for ``w >= 0.5``), and the
  endpoints are copied outright anyway, so ``alpha = 0`` / ``1`` reproduce the endpoints bit for bit.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from .errors import AdapterError, ConfigError
from .export import atomic_write_text, import_class, load_adapter, read_metadata

log = logging.getLogger("vision_ft")


def interpolate_state(zero_shot: dict[str, torch.Tensor], fine_tuned: dict[str, torch.Tensor],
                      alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * zero_shot + alpha * fine_tuned`` over floating tensors; others from ``fine_tuned``."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"--interpolate {alpha}: alpha must lie in [0, 1] (0 = zero-shot, 1 = fine-tuned)")
    missing = sorted(set(fine_tuned) ^ set(zero_shot))
    if missing:
        raise AdapterError(f"the zero-shot and fine-tuned models have different tensors ({missing[:3]}...): "
                           "was the method merged completely?")
    out: dict[str, torch.Tensor] = {}
    for key, tuned in fine_tuned.items():
        zero = zero_shot[key]
        if zero.shape != tuned.shape:
            raise AdapterError(f"{key}: zero-shot shape {tuple(zero.shape)} != fine-tuned {tuple(tuned.shape)}")
        if not tuned.is_floating_point():
            if not torch.equal(zero.to(tuned.device), tuned):
                raise AdapterError(f"{key}: integer tensor differs between the zero-shot and fine-tuned models")
            out[key] = tuned.clone()
        elif alpha == 0.0:
            out[key] = zero.to(tuned).clone()
        elif alpha == 1.0:
            out[key] = tuned.clone()
        else:
            out[key] = torch.lerp(zero.to(tuned.device, torch.float32), tuned.float(), alpha).to(tuned.dtype)
    return out


def alpha_dir_name(alpha: float) -> str:
    return f"alpha_{alpha:.2f}" if round(alpha, 2) == alpha else f"alpha_{alpha:g}"


def export_interpolated(run_dir: str | Path, out_dir: str | Path, alphas: list[float],
                        backbone: dict[str, Any] | None = None) -> list[Path]:
    """Write one native export per ``alpha`` (``OUT`` itself for one alpha, ``OUT/alpha_0.50``... for a sweep)."""
    if not alphas:
        raise ConfigError("--interpolate needs at least one alpha")
    for a in alphas:
        if not 0.0 <= a <= 1.0:
            raise ConfigError(f"--interpolate {a}: alpha must lie in [0, 1] (0 = zero-shot, 1 = fine-tuned)")
    meta = read_metadata(run_dir)
    task_cls = import_class(meta["task"])
    if not getattr(task_cls, "has_zero_shot_model", False):
        raise AdapterError(f"WiSE-FT interpolates towards a zero-shot model; {task_cls.__name__} has a trained head "
                           "with no zero-shot counterpart (use a CLIP task: CLIPClassificationTask and its kin)")
    task = load_adapter(run_dir, backbone=backbone)
    method = task.method
    if not method.mergeable:
        raise AdapterError(f"method {method.name!r} adds tensors that are not weights of the model (nothing to "
                           "interpolate with the zero-shot weights); WiSE-FT needs a mergeable method or full "
                           "fine-tuning")
    method.merge(task.backbone)
    tuned = {k: v.detach().clone() for k, v in task.backbone.model.state_dict().items()}
    zero_backbone = task_cls.backbone_from_metadata(meta, backbone)
    zero = zero_backbone.model.state_dict()
    del zero_backbone
    outs = []
    for alpha in alphas:
        target = Path(out_dir) if len(alphas) == 1 else Path(out_dir) / alpha_dir_name(alpha)
        task.backbone.model.load_state_dict(interpolate_state(zero, tuned, alpha), strict=True)
        out = Path(task.export_native(target))
        doc = dict(meta, merged=True, exported_from=str(Path(run_dir).resolve()),
                   wise_ft={"alpha": alpha, "zero_shot": meta["backbone"], "fine_tuned": str(Path(run_dir).resolve())})
        atomic_write_text(out / "vision_ft.json", json.dumps(doc, indent=2, default=str) + "\n")
        log.info("[vision_ft] WiSE-FT alpha=%g written to %s", alpha, out)
        outs.append(out)
    return outs
