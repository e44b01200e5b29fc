"""The uniform surface every backbone family offers to methods and tasks.

A method is written once against :class:`Backbone`: it asks for blocks, for where the
weight playing a role in a block (``q k v qkv proj fc1 fc2``) lives (:meth:`Backbone.weight_ref`,
turned into a site by :mod:`vision_ft.methods.sites`) and for the norms, and never needs to
know which library built the model.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: attention q/k/v (or the fused qkv) and output projection; MLP first and second layer, plus the gate of a
#: gated MLP (``gate``) and the fused gate+up projection (``gate_up``) of language models that have them, and
#: the cross-attention projections of blocks that have one (the Stable Diffusion UNet's ``attn2``)
ROLES = ("q", "k", "v", "qkv", "proj", "fc1", "fc2", "gate", "gate_up", "cross_q", "cross_k", "cross_v", "cross_proj")


@dataclass(frozen=True)
class WeightRef:
    """Where the weight playing a role lives inside ``Backbone.model``: family knowledge, told by the backbone.

    ``module`` (dotted name) owns the parameter ``param`` (and ``bias``, ``None`` if it has none); the
    role is its rows ``start:stop`` (``stop=None``: all rows) -- q, k or v inside timm's fused ``qkv``
    or open_clip's packed ``in_proj_weight``, q/k/v inside Phi-3's ``qkv_proj`` -- and ``key`` names that
    slice (``""`` for a whole weight). ``reader``: the dotted name of the module whose forward reads the
    parameter directly (open_clip's ``nn.MultiheadAttention``), ``None`` when ``module``'s own forward
    computes the output. Methods never use this directly: :mod:`vision_ft.methods.sites` turns it into
    a site with one API for every family.
    """

    module: str
    param: str = "weight"
    bias: str | None = "bias"
    start: int = 0
    stop: int | None = None
    key: str = ""
    reader: str | None = None


class Backbone(nn.Module):
    """Base class: wraps one library model, kept untouched in type as ``self.model``."""

    model: nn.Module
    #: how the weights were obtained, printed at start and written to adapter.json
    weights_source: str = "unknown"

    # --- structure -----------------------------------------------------------------
    @property
    def blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def embed_dim(self) -> int:
        raise NotImplementedError

    def block_width(self, block: int) -> int:
        """Token width inside ``block`` (CLIP towers differ from each other and from ``embed_dim``)."""
        return self.embed_dim

    def module_name(self, block: int, role: str) -> str:
        """Dotted name (inside ``self.model``) of the module for ``role`` in ``block``."""
        raise NotImplementedError

    def weight_ref(self, block: int, role: str) -> WeightRef:
        """Where the weight for ``role`` (``q k v qkv proj fc1 fc2``) of ``block`` lives. A backbone without
        that role raises :class:`~vision_ft.errors.ConfigError` saying why (e.g. no fused ``qkv``)."""
        raise NotImplementedError

    @property
    def default_lora_targets(self) -> list[str]:
        """The roles ``lora`` adapts when its ``targets`` are unset: the fused ``qkv`` by default; families
        without one say theirs (causal LMs: every projection; Stable Diffusion: the diffusers set)."""
        return ["qkv"]

    def module_ref(self, module: nn.Module) -> WeightRef:
        """Where the weight of a whole module of ``self.model`` lives (a norm, the stem convolution)."""
        from ..errors import ConfigError

        for name, m in self.model.named_modules():
            if m is module:
                if not isinstance(getattr(m, "weight", None), torch.Tensor):
                    raise ConfigError(f"{name} ({type(m).__name__}) has no weight to adapt")
                return WeightRef(name, "weight", "bias" if "bias" in m._parameters else None)
        raise ConfigError(f"{type(module).__name__} is not a module of this backbone")

    def class_token(self) -> tuple[str, str] | None:
        """``(parameter, module)``: the class-token parameter and the module whose input starts with it
        (token 0, batch first), where a method adds a class-token delta; ``None`` without one (default)."""
        return None

    # --- towers (two-tower backbones override) --------------------------------------------
    def tower_names(self) -> list[str]:
        """The towers whose blocks ``blocks`` lists (``[]``: a single-tower model)."""
        return []

    def tower(self, block: int) -> str | None:
        """The tower of block ``block`` (``None`` on a single-tower model)."""
        return None

    def tower_block(self, block: int) -> int:
        """Index of block ``block`` inside its tower."""
        return block

    def norms(self, block: int) -> dict[str, nn.Module]:
        raise NotImplementedError

    def stem(self) -> nn.Module:
        """The patch-embedding projection (a Conv2d for ViTs)."""
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        """The norm applied to the tokens after the last block."""
        raise NotImplementedError

    def stem_parameter_names(self) -> list[str]:
        """Names (inside ``self.model``) of the stem's parameters: the patch embedding of a ViT, the
        first convolution of a CNN (what full fine-tuning's ``train_patch_embed: false`` freezes)."""
        own = {id(p) for p in self.stem().parameters()}
        return [n for n, p in self.model.named_parameters() if id(p) in own]

    def no_decay_parameter_names(self) -> list[str]:
        """Parameters (names inside ``self.model``) exempt from weight decay besides 1-D ones: position
        embeddings and class / register tokens. Default: the library model's own ``no_weight_decay()``
        (timm, open_clip) where it has one."""
        listed = getattr(self.model, "no_weight_decay", None)
        names = set(listed()) if callable(listed) else set()
        return [n for n, _ in self.model.named_parameters() if n in names]

    # --- compute ------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B,3,H,W) -> normalised model input at the model's size."""
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised input -> (pooled features (B,D), token features (B,N,D))."""
        raise NotImplementedError

    # --- identity ------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """class_path + init_args that rebuild this backbone (written to adapter.json)."""
        raise NotImplementedError

    # --- native export of an image classifier ------------------------------------------
    #: the family can write "this model + a linear head on ``features()[0]``" in its library's own
    #: format (:meth:`save_classifier`); image classification tasks refuse a backbone without it
    native_classifier_export: bool = False

    def save_classifier(self, out_dir: str | Path, head: nn.Linear, class_names: list[str]) -> Path:
        """Write this model with ``head`` applied to the pooled features as a folder its library
        loads alone; ``head(features(preprocess(x))[0])`` must be reproducible from it."""
        raise NotImplementedError(f"{type(self).__name__} has no native export of an image classifier")

    def fingerprint(self) -> str:
        """Digest of the base weights, to refuse adapters trained on other weights.

        Each tensor contributes its name, shape and up to 4096 evenly strided
        values, so the cost stays small on large models.
        """
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            h.update(flat[::step].to(torch.float32).cpu().numpy().tobytes())
        return h.hexdigest()[:16]


TOWERS = ("visual", "text")


class TwoTowerBackbone(Backbone):
    """A CLIP-style backbone: ``blocks`` are the residual blocks of the towers in ``self.towers``
    (visual first, then text, by default), indexed across towers; subclasses name each tower's
    block list with :meth:`_tower_prefix`, check ``towers`` with :meth:`_check_towers` before building
    and call :meth:`_index_towers` once the model exists."""

    towers: list[str]
    _index: list[tuple[str, int]]

    def _tower_prefix(self, tower: str) -> str:
        """Dotted name (inside ``self.model``) of the tower's list of blocks."""
        raise NotImplementedError

    def _check_towers(self, towers: list[str]) -> None:
        from ..errors import ConfigError

        bad = [t for t in towers if t not in TOWERS] or ([] if towers else ["(empty)"])
        if bad or len(set(towers)) != len(towers):
            raise ConfigError(f"backbone.init_args.towers={towers!r}: choose distinct entries from {list(TOWERS)}")
        self.towers = list(towers)

    def _index_towers(self) -> None:
        self._index = [(t, j) for t in self.towers for j in range(len(self._tower_blocks(t)))]

    def _tower_blocks(self, tower: str) -> list[nn.Module]:
        return list(self.model.get_submodule(self._tower_prefix(tower)))

    @property
    def blocks(self) -> list[nn.Module]:
        return [self._tower_blocks(t)[j] for t, j in self._index]

    @property
    def num_blocks(self) -> int:
        return len(self._index)

    def tower_names(self) -> list[str]:
        return list(self.towers)

    def tower(self, block: int) -> str:
        """``visual`` or ``text``: the tower of block ``block``."""
        return self._index[block][0]

    def tower_block(self, block: int) -> int:
        """Index of block ``block`` inside its tower."""
        return self._index[block][1]


def fold_patch_bias(state: dict[str, torch.Tensor], bias: str, positions: str, class_token: bool) -> dict[str, torch.Tensor]:
    """``state`` without the patch-embedding bias ``bias``, added instead to the position embedding
    ``positions`` (rows after the class token when ``class_token``): exact when the position embedding
    is added at its own size, because the bias shifts every patch token and nothing else. For exports
    to libraries whose patch convolution has no bias (CLIP's), after a method merged a shift into it."""
    if bias not in state:
        return state
    state = dict(state)
    shift = state.pop(bias)
    pos = state[positions].clone()
    pos[..., 1 if class_token else 0:, :] += shift.to(pos.dtype)
    state[positions] = pos
    return state


def resolve_checkpoint(checkpoint: str, names: tuple[str, ...]) -> Path:
    """``backbone.init_args.checkpoint`` as a file: the path itself, or the first of ``names`` in a folder."""
    from ..errors import BackboneError

    path = Path(os.path.expanduser(checkpoint))
    if path.is_dir():
        for fname in names:
            if (path / fname).is_file():
                return path / fname
        raise BackboneError(f"backbone.init_args.checkpoint={checkpoint!r} is a folder without "
                            f"{' / '.join(names[:2])}")
    if not path.is_file():
        raise BackboneError(f"backbone.init_args.checkpoint={checkpoint!r}: no such file")
    return path


from ..errors import first_line  # noqa: F401  (re-exported for the backbone modules)
