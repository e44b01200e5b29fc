"""Optional image-generation metrics through torchmetrics: FID and KID (Inception features) and CLIP score.

They need weights the kit does not ship: the FID Inception network (``torch-fidelity``'s
``pt_inception-2015-12-05`` file, downloaded by torchmetrics unless a local file is given) and a CLIP model
(transformers). Offline without them, :func:`build_generation_metrics` fails at set-up with one clear error
naming the key to set, instead of after training.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn

from ..errors import BackboneError, ConfigError, first_line

METRICS = ("fid", "kid", "clip_score")


def build_generation_metrics(names: list[str], inception_weights: str | None, clip_model: str,
                             kid_subset_size: int = 50) -> nn.ModuleDict:
    """``{"fid": FrechetInceptionDistance, "kid": KernelInceptionDistance, "clip_score": CLIPScore}`` as asked."""
    bad = [n for n in names if n not in METRICS]
    if bad:
        raise ConfigError(f"model.init_args.metrics: unknown {bad}; choose from {list(METRICS)}")
    out = nn.ModuleDict()
    for name in names:
        try:
            if name in ("fid", "kid"):
                from torchmetrics.image.fid import FrechetInceptionDistance
                from torchmetrics.image.kid import KernelInceptionDistance

                kw: dict[str, Any] = {"normalize": True}
                if inception_weights:
                    kw["feature_extractor_weights_path"] = inception_weights
                out[name] = (FrechetInceptionDistance(feature=2048, **kw) if name == "fid"
                             else KernelInceptionDistance(subset_size=kid_subset_size, **kw))
            else:
                from torchmetrics.multimodal.clip_score import CLIPScore

                out[name] = CLIPScore(model_name_or_path=partial(_load_clip, clip_model))
        except Exception as e:  # noqa: BLE001 - missing package or weights offline: one clear error
            key = ("model.init_args.inception_weights=<FID Inception .pth> (and pip install torch-fidelity)"
                   if name in ("fid", "kid") else "model.init_args.clip_model=<local CLIP folder>")
            raise BackboneError(f"metric {name!r} cannot be built ({first_line(e, root_cause=True)}): it needs weights "
                                f"that are not available here. Set {key}, or drop it from model.init_args.metrics") from None
    return out


def _load_clip(name_or_folder: str) -> tuple[Any, Any]:
    """A transformers CLIP (hub id or local ``save_pretrained`` folder) for torchmetrics' CLIPScore, whose
    feature calls expect tensors: transformers 5 returns output objects from ``get_image_features`` /
    ``get_text_features``, so their projected ``pooler_output`` is handed over instead."""
    from transformers import CLIPModel, CLIPProcessor

    class _CLIPFeatures(CLIPModel):
        def get_image_features(self, *args: Any, **kwargs: Any):
            out = super().get_image_features(*args, **kwargs)
            return getattr(out, "pooler_output", out)

        def get_text_features(self, *args: Any, **kwargs: Any):
            out = super().get_text_features(*args, **kwargs)
            return getattr(out, "pooler_output", out)

    return _CLIPFeatures.from_pretrained(name_or_folder), CLIPProcessor.from_pretrained(name_or_folder)
