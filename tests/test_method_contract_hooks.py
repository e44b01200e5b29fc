"""The written-down method contract: every hook and flag a task uses is declared on ``Method`` (with
its default), tasks never probe a method with ``hasattr``/``getattr``, and trainability is the one
predicate ``Method.is_trainable`` (plus the task's heads / detection's freeze policy)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from conftest import make_task

from vision_ft.methods import Method, registered

TASKS = sorted((Path(__file__).resolve().parents[1] / "vision_ft" / "tasks").glob("*.py"))
HOOKS = ("set_class_names", "class_text_features", "training_loss", "ood_scores", "id_logits", "adjust_loss",
         "regularizer", "prepare", "on_train_end")
TIMM_METHODS = sorted(n for n, cls in registered().items() if not cls.requires_text_tower
                      and not cls.needs_in_context_task)
CLIP_METHODS = sorted(n for n, cls in registered().items() if cls.requires_text_tower)


# --- what tasks read from a method ---------------------------------------------------------------
def _is_self_method(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "method" and isinstance(node.value, ast.Name)
            and node.value.id == "self")


def _method_refs(tree: ast.AST) -> set[int]:
    """Ids of the nodes that are the method: ``self.method``, or inside a function a local name bound
    to it (``m = self.method``) or a parameter annotated ``Method``."""
    refs = {id(n) for n in ast.walk(tree) if _is_self_method(n)}
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        aliases = {a.arg for a in fn.args.args + fn.args.kwonlyargs
                   if a.annotation is not None and ast.unparse(a.annotation) == "Method"}
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign):
                pairs = []
                for target in node.targets:
                    if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                        pairs += list(zip(target.elts, node.value.elts))
                    else:
                        pairs.append((target, node.value))
                aliases |= {t.id for t, v in pairs if isinstance(t, ast.Name) and _is_self_method(v)}
        refs |= {id(n) for n in ast.walk(fn) if isinstance(n, ast.Name) and n.id in aliases}
    return refs


def _task_reads() -> dict[str, set[str]]:
    """``{file: attribute names read on the method}`` over vision_ft/tasks/*.py."""
    out = {}
    for path in TASKS:
        tree = ast.parse(path.read_text())
        refs = _method_refs(tree)
        out[path.name] = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and id(n.value) in refs}
    return out


def test_the_parser_sees_what_tasks_read():
    reads = _task_reads()
    assert {"class_text_features", "training_loss", "provides_text_features"} <= reads["clip_classification.py"]
    assert {"ood_scores", "id_logits"} <= reads["clip_ood.py"]
    assert {"trains_base_weights", "adds_tensors", "is_trainable"} <= reads["detection_policy.py"]
    assert {"requires_text_tower", "needs_image_classification_task", "regularizer"} <= reads["base.py"]


def test_every_hook_and_flag_a_task_uses_is_declared_on_method():
    undeclared = {f"{file}: {name}" for file, names in _task_reads().items() for name in names
                  if not hasattr(Method, name)}
    assert not undeclared, f"declare these on vision_ft.methods.Method (with a default and docstring): {undeclared}"


def test_no_task_probes_a_method_with_hasattr_or_getattr():
    probes = []
    for path in TASKS:
        tree = ast.parse(path.read_text())
        refs = _method_refs(tree)
        probes += [f"{path.name}:{n.lineno} {ast.unparse(n)}" for n in ast.walk(tree)
                   if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("hasattr", "getattr")
                   and n.args and id(n.args[0]) in refs]
    assert not probes, probes


def test_no_task_branches_on_a_method_name():
    """``method.name == "full"`` in a task bends the contract; declared flags say what a method needs."""
    branches = []
    for path in TASKS:
        tree = ast.parse(path.read_text())
        refs = _method_refs(tree)
        for n in ast.walk(tree):
            if isinstance(n, ast.Compare):
                sides = [n.left, *n.comparators]
                names = any(isinstance(s, ast.Attribute) and s.attr == "name" and id(s.value) in refs for s in sides)
                literal = any(isinstance(s, (ast.Constant, ast.Tuple, ast.List, ast.Set)) for s in sides)
                if names and literal:
                    branches.append(f"{path.name}:{n.lineno} {ast.unparse(n)}")
    assert not branches, branches


# --- declared defaults -----------------------------------------------------------------------------
def test_declared_defaults_mean_the_tasks_own_behaviour():
    m = Method()
    assert m.class_text_features(None, ["a"]) is None and m.training_loss(None, None, None) is None
    assert m.ood_scores(None, None) == {} and m.id_logits(None, None) is None
    assert m.regularizer({}, None) == {} and m.adjust_loss(loss := torch.tensor(1.0), {}, None) is loss
    assert not (m.requires_text_tower or m.trains_base_weights or m.provides_text_features or m.requires_data)
    assert m.trains_own_tensors and not m.adds_tensors and not m.needs_image_classification_task
    assert not m.needs_in_context_task
    assert m.class_names is None and m.frozen_base_weights == frozenset()
    m.set_class_names(("cat", "dog"))
    assert m.class_names == ["cat", "dog"]


@pytest.mark.parametrize("name", sorted(registered()))
def test_overridden_hooks_keep_the_declared_signature(name):
    cls = registered()[name]
    for hook in HOOKS:
        if getattr(cls, hook) is not getattr(Method, hook):
            assert list(inspect.signature(getattr(cls, hook)).parameters) == \
                list(inspect.signature(getattr(Method, hook)).parameters), (name, hook)
    overrides_text = cls.class_text_features is not Method.class_text_features
    assert overrides_text == cls.provides_text_features, name


# --- trainability: one predicate -------------------------------------------------------------------
def _check_requires_grad_follows_the_predicate(task):
    method = task.method
    wrong = [n for n, p in task.backbone.model.named_parameters() if p.requires_grad != method.is_trainable(n)]
    assert not wrong, wrong[:5]
    assert all(p.requires_grad for m in task.head_modules().values() for p in m.parameters())


@pytest.mark.parametrize("name", TIMM_METHODS)
def test_requires_grad_is_the_methods_predicate_on_the_timm_task(name):
    _check_requires_grad_follows_the_predicate(make_task(name))


@pytest.mark.parametrize("name", CLIP_METHODS)
def test_requires_grad_is_the_methods_predicate_on_the_clip_task(name):
    from vision_ft.backbones.open_clip import OpenCLIP
    from vision_ft.tasks import CLIPClassificationTask

    task = CLIPClassificationTask(OpenCLIP("open_clip_test_tiny"), method=name, num_classes=2, class_names=["a", "b"])
    _check_requires_grad_follows_the_predicate(task)


def test_full_fine_tuning_freezes_the_backbones_stem_and_exempts_its_tokens_on_every_family():
    from vision_ft.backbones import TimmViT
    from vision_ft.backbones.open_clip import OpenCLIP
    from vision_ft.tasks import CLIPClassificationTask

    full = {"class_path": "vision_ft.methods.FullFineTuning", "init_args": {"train_patch_embed": False}}
    timm = make_task(full)
    clip = CLIPClassificationTask(OpenCLIP("open_clip_test_tiny"), method=full, num_classes=2, class_names=["a", "b"])
    for task, stem, tokens in ((timm, {"patch_embed.proj.weight", "patch_embed.proj.bias"}, {"cls_token", "pos_embed"}),
                               (clip, {"visual.conv1.weight"},
                                {"positional_embedding", "visual.class_embedding", "visual.positional_embedding"})):
        frozen = {n for n, p in task.backbone.model.named_parameters() if not p.requires_grad}
        assert frozen == stem == set(task.backbone.stem_parameter_names())
        assert set(task.backbone.no_decay_parameter_names()) == tokens
        params = dict(task.backbone.model.named_parameters())
        no_decay = {id(p) for g in task.param_groups() if g["weight_decay"] == 0.0 for p in g["params"]}
        assert all(id(params[n]) in no_decay for n in tokens)
    assert isinstance(timm.backbone, TimmViT)


def test_dr_tune_trains_the_base_weights_and_never_its_frozen_copy():
    task = make_task("dr_tune")
    method = task.method
    assert method.trains_base_weights and not method.trains_own_tensors
    trainable = {n for n, p in task.backbone.model.named_parameters() if p.requires_grad}
    assert trainable and not any(method.is_own(n) for n in trainable)
    assert any(method.is_own(n) for n, _ in task.backbone.model.named_parameters())  # the frozen copy f_0


@pytest.mark.parametrize("method,freeze", [
    ("full", "none"), ("linear", "backbone"),
    ({"class_path": "vision_ft.methods.LoRA", "init_args": {"r": 2, "targets": ["proj", "fc1"]}}, "all")])
def test_detection_trains_what_the_declared_policy_says(method, freeze):
    from vision_ft.backbones.dfine import DFineDetector
    from vision_ft.tasks.detection import FREEZE_POLICIES, DetectionTask, default_freeze

    task = DetectionTask(DFineDetector("dfine_test_tiny"), method=method, num_classes=2, class_names=["a", "b"])
    assert task.freeze == default_freeze(task.method) == freeze
    parts = FREEZE_POLICIES[freeze]
    for name, p in task.backbone.model.named_parameters():
        expected = task.method.is_trainable(name) or task.backbone.part_of(name) in parts
        assert p.requires_grad == expected, name
