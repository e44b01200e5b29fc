"""PEFT methods: the protocol, the registry, and the methods themselves.

Importing this package registers every built-in method.
"""

from .adapters import AdaptFormer, Adapter
from .base import Method, has_prefix
from .block_lora import BlockLoRA
from .clip_lora import CLIPLoRA
from .comp_lora import CompLoRA
from .coop import CoOp
from .baselines import FullFineTuning, LinearProbe
from .dr_tune import DRTune
from .local_prompt import LocalPrompt
from .lora import LoRA
from .mosa import MoSA
from .pego import PEGO
from .q_adapter import QAdapter
from .registry import build_method, get_method_class, register, registered, unregister
from .sara import SaRA
from .snell import SNELL
from .spt import SPTAdapter, SPTLoRA
from .ssf import SSF
from .tic_ft import TICFT

__all__ = [
    "Method", "has_prefix", "register", "registered", "unregister", "build_method",
    "get_method_class", "LinearProbe", "FullFineTuning", "SSF", "LoRA", "DRTune",
    "Adapter", "AdaptFormer", "MoSA", "SNELL", "PEGO", "SPTLoRA", "SPTAdapter",
    "CLIPLoRA", "CoOp", "CompLoRA", "BlockLoRA", "LocalPrompt", "SaRA", "TICFT", "QAdapter",
]
