"""The method contract over the whole (method x family) matrix, through the site layer.

Every registered method that adapts weights by itself, or supplies the CLIP class text features
(CoOp: its output here is the image features plus its class text features), is applied to a tiny
model of every family the site layer covers. Not here: the data-dependent SPT (its contract runs on
the timm task in test_method_spt) and Local-Prompt, whose prompts act only through the CLIP OOD task's
hooks (tests/test_method_local_prompt.py). A pair either passes the contract -- only the
method's tensors train, a step changes only those, save -> load reproduces the output bit for bit,
merged == unmerged within 1e-5 leaving the library model, identity at init where the update is zero
-- or is refused with an error saying why, as pinned in ``REFUSED``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from site_families import FAMILIES
from vision_ft.errors import VisionFTError
from vision_ft.methods import registered, sites

METHODS = sorted(n for n, c in registered().items()
                 if not c.requires_data and (not c.requires_text_tower or c.provides_text_features))
NAMES = ["a cat", "an x-ray"]
TEXTLESS = ("timm", "dfine", "llama", "phi3", "unet", "wan")

#: pairs that must be refused, with a phrase of the reason the error gives
REFUSED = {
    ("open_clip", "lora"): "read directly by",  # peft adapts modules with their own forward, not packed MHA weights
    ("open_clip", "tic_ft"): "read directly by",  # its default adapter is that peft LoRA
    ("dfine", "ssf"): "no final token norm",  # SSF's paper placement ends on the final norm
    ("llama", "ssf"): "no patch-embedding stem",
    ("phi3", "ssf"): "no patch-embedding stem",
    ("wan", "ssf"): "has no weight to adapt",  # Wan's block and output norms are not affine
    **{(f, "coop"): "needs a CLIP backbone with a text tower" for f in TEXTLESS},
}
#: families without a fused qkv: HF peft LoRA targets the separate q and v projections there
SEPARATE_QKV = {"hf_clip", "dfine", "llama", "unet", "wan"}


def _config(family: str, name: str) -> dict:
    if name == "lora" and family in SEPARATE_QKV:
        return {"targets": ["q", "v"]}
    if name == "tic_ft" and family in SEPARATE_QKV:  # its adapter, the peft LoRA
        return {"adapter": {"class_path": "vision_ft.methods.LoRA", "init_args": {"targets": ["q", "v"]}}}
    return {}


@functools.lru_cache(maxsize=None)
def _base(family: str):
    build, _ = FAMILIES[family]
    return build().eval()


def _fresh(family: str):
    return copy.deepcopy(_base(family))


def _forward(family: str, backbone, method=None) -> torch.Tensor:
    out = FAMILIES[family][1](backbone).float()
    if method is not None and type(method).provides_text_features:
        out = torch.cat([out.flatten(), method.class_text_features(backbone, NAMES).float().flatten()])
    return out


def _out(family: str, backbone, method=None) -> torch.Tensor:
    with torch.no_grad():
        return _forward(family, backbone, method)


def _perturb(backbone, scale=0.05):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in backbone.model.parameters():
            if p.requires_grad and p.is_floating_point():
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def _applied(family: str, name: str):
    method = registered()[name](**_config(family, name))
    method.set_class_names(NAMES)
    backbone = _fresh(family)
    method.apply(backbone)
    backbone.eval()
    return method, backbone


PAIRS = [(f, m) for f in FAMILIES for m in METHODS]


@pytest.mark.parametrize("family,name", PAIRS)
def test_method_contract_on_every_family(family, name):
    if (family, name) in REFUSED:
        with pytest.raises(VisionFTError, match=REFUSED[(family, name)]):
            _applied(family, name)
        return
    method, backbone = _applied(family, name)
    cls = type(method)
    model = backbone.model
    # 1. trainable = what the method's predicate says, and (unless it trains base weights) prefixed tensors only
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if method.is_trainable(n)}
    if cls.prefix and not cls.trains_base_weights:
        assert trainable and all(cls.prefix in n for n in trainable)
    # 2. identity at init where the update is zero-initialised
    if cls.zero_init:
        base = _fresh(family)
        flags = dict(model.named_parameters())  # kernels (torch attention, D-FINE) depend on requires_grad
        for n, p in base.model.named_parameters():
            p.requires_grad_(n in flags and flags[n].requires_grad)  # absent: a peft-wrapped frozen base layer
        assert torch.equal(_out(family, base), _out(family, backbone))
    # 3. a step changes only trainable tensors (and does change some)
    _perturb(backbone)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    if params:
        _forward(family, backbone, method).pow(2).mean().backward()
        torch.optim.SGD(params, lr=0.1).step()
        changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
        aliases = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}  # tied heads
        assert changed and changed <= aliases
        model.zero_grad(set_to_none=True)
    # 4. save -> load into a fresh model reproduces the output bit for bit
    state = method.adapter_state_dict(backbone)
    other_method, other = _applied(family, name)
    other_method.load_adapter(other, state)
    expected = _out(family, backbone, method)
    assert torch.equal(expected, _out(family, other, other_method))
    # 5. merged == unmerged, leaving the library's own model type with no method tensors
    if cls.mergeable:
        model_type = type(model)
        method.merge(backbone)
        assert torch.allclose(_out(family, backbone, method), expected, atol=1e-5, rtol=1e-5)
        assert type(backbone.model) is model_type
        if cls.prefix:
            assert not any(cls.prefix in n for n in backbone.model.state_dict())
            assert not sites.owned(backbone.model, cls.prefix)
    else:
        with pytest.raises(VisionFTError, match="cannot be merged"):
            method.merge(backbone)


def test_every_family_has_pairs_that_apply():
    """The matrix is not vacuous: every family takes most methods."""
    for family in FAMILIES:
        applied = [m for m in METHODS if (family, m) not in REFUSED]
        assert len(applied) >= len(METHODS) - 2, family


def _runtime_imports(tree):
    """Import statements executed at import time (``if TYPE_CHECKING:`` blocks skipped)."""
    import ast

    def walk(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
                yield from walk(node.orelse)
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from walk(getattr(node, field, []) or [])

    return list(walk(tree.body))


def test_no_method_module_imports_a_backbone_module_or_names_a_family():
    """Methods touch weights only through sites: no runtime import from vision_ft.backbones, no backbone class
    used in code (a method that needs a family's knowledge asks the backbone; error messages may name one)."""
    import ast
    from pathlib import Path

    import vision_ft.methods

    families = ("TimmViT", "OpenCLIP", "HFCLIP", "DFineDetector", "PackedSlice", "AttentionWeight")
    offenders = []
    for path in sorted(Path(vision_ft.methods.__file__).parent.rglob("*.py")):
        text = path.read_text()
        for node in _runtime_imports(ast.parse(text)):
            module = node.module or "" if isinstance(node, ast.ImportFrom) else ",".join(a.name for a in node.names)
            if "backbones" in module:
                offenders.append(f"{path.name}:{node.lineno} imports {module}")
        names = {n.id for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Attribute)}
        offenders += [f"{path.name} uses {name}" for name in families if name in names]  # messages may name them
    assert not offenders, offenders
