"""Sharded training (FSDP) for every backbone family: wrap the backbone's own transformer blocks.

``BackboneBlocks`` is an FSDP auto-wrap policy that needs no class names: it asks the task's backbone for
its blocks (``Backbone.blocks``, one list for every family) and wraps each block's class as one FSDP unit.
``towers`` restricts it to some towers of a two-tower model; the other tower stays in the root unit, which
every rank gathers at every forward. For vision-language models the fragment keeps the vision tower there
(``towers: [language]``): a rank whose batch holds no image then skips no collective, so ranks with
different image/text mixes cannot hang, and the vision tower (hundreds of millions of parameters against
billions in the language model) costs little unsharded.

    trainer:
      strategy:
        class_path: lightning.pytorch.strategies.FSDPStrategy
        init_args:
          auto_wrap_policy: {class_path: vision_ft.sharding.BackboneBlocks, init_args: {towers: [language]}}
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from .errors import ConfigError


def _backbone_of(root: nn.Module) -> Any:
    from .backbones.base import Backbone

    found = [m for m in root.modules() if isinstance(m, Backbone)]
    if not found:
        raise ConfigError("vision_ft.sharding.BackboneBlocks wraps a vision_ft backbone's blocks, and the model "
                          f"being sharded ({type(root).__name__}) holds none")
    return found[0]


def block_classes(backbone: Any, towers: list[str] | None = None) -> set[type[nn.Module]]:
    """Classes of the backbone's blocks (of ``towers`` only, when given)."""
    names = backbone.tower_names()
    if towers:
        unknown = sorted(set(towers) - set(names))
        if unknown:
            raise ConfigError(f"auto_wrap_policy towers={towers}: {unknown} not among this backbone's towers "
                              f"{names or '(a single-tower model: leave towers unset)'}")
        index = [i for i in range(backbone.num_blocks) if backbone.tower(i) in towers]
    else:
        index = list(range(backbone.num_blocks))
    return {type(backbone.blocks[i]) for i in index}


class BackboneBlocks(ModuleWrapPolicy):
    """FSDP auto-wrap policy: one unit per block of the task's backbone (see the module doc). A
    ``ModuleWrapPolicy`` whose classes are read from the model when FSDP wraps it.

    Args:
        towers: wrap only these towers' blocks (``vision`` / ``language``, ``image`` / ``text``); default all.
    """

    def __init__(self, towers: list[str] | None = None) -> None:
        super().__init__(set())
        self.towers = list(towers) if towers else None

    def _run_policy(self, root_module: nn.Module, ignored_modules: set[nn.Module],
                    root_kwargs: dict[str, Any]) -> dict[nn.Module, dict[str, Any]]:
        classes = block_classes(_backbone_of(root_module), self.towers)
        return ModuleWrapPolicy(classes)._run_policy(root_module, ignored_modules, root_kwargs)

    def __repr__(self) -> str:
        return f"BackboneBlocks(towers={self.towers})"
