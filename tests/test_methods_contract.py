"""The contract every registered method honours (parametrised over the registry)."""

import pytest
import torch

from conftest import make_task
from vision_ft.methods import registered

# methods that need a CLIP text tower (CoOp) have their own contract tests on the tiny open_clip model
METHODS = sorted(n for n, cls in registered().items()
                 if not getattr(cls, "requires_text_tower", False) and not cls.needs_in_context_task)
X = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _perturb(task, scale=0.1):
    """Move trainable backbone tensors away from init so equality tests mean something."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in task.backbone.model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", METHODS)
def test_only_declared_parameters_are_trainable(name):
    task = make_task(name)
    method = task.method
    names = {n for n, p in task.backbone.model.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in task.backbone.model.named_parameters() if method.is_trainable(n)}
    if method.trains_base_weights:  # full FT; dr_tune's prefixed tensors are frozen state
        assert names and not any(method.is_own(n) for n in names)
    elif method.prefix:
        assert names and all(method.prefix in n for n in names)
    assert all(p.requires_grad for p in task.head.parameters())


@pytest.mark.parametrize("name", METHODS)
def test_training_step_changes_only_trainable_tensors(name):
    task = make_task(name)
    _perturb(task)  # zero-initialised B factors would otherwise block A's gradient
    before = {k: v.clone() for k, v in task.state_dict().items()}
    opt = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.5)
    loss = task.loss(task(X), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    trainable = {f"backbone.model.{n}" for n, p in task.backbone.model.named_parameters() if p.requires_grad}
    trainable |= {f"head.{n}" for n, _ in task.head.named_parameters()}
    after = task.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= trainable
    assert {"head.weight", "head.bias"} <= changed
    if trainable - {"head.weight", "head.bias"}:
        assert changed - {"head.weight", "head.bias"}, "no backbone tensor trained"


@pytest.mark.parametrize("name", METHODS)
def test_adapter_roundtrip_is_bitwise(name, tmp_path):
    from vision_ft.export import load_adapter, save_adapter

    task = make_task(name).eval()
    _perturb(task)
    torch.nn.init.normal_(task.head.weight)
    save_adapter(task, tmp_path, {"val/acc": 0.5})
    loaded = load_adapter(tmp_path)
    assert type(loaded.method) is type(task.method)
    with torch.no_grad():
        assert torch.equal(task(X), loaded(X))


@pytest.mark.parametrize("name", [n for n in METHODS if registered()[n].mergeable])
def test_merged_equals_unmerged(name):
    task = make_task(name).eval()
    _perturb(task)
    with torch.no_grad():
        before = task(X)
        task.method.merge(task.backbone)
        after = task(X)
    assert torch.allclose(before, after, atol=1e-5, rtol=0)
    leftovers = [n for n, _ in task.backbone.model.named_parameters()
                 if task.method.prefix and task.method.prefix in n]
    assert not leftovers
    assert type(task.backbone.model).__name__ == "VisionTransformer"


@pytest.mark.parametrize("name", [n for n in METHODS if registered()[n].zero_init])
def test_zero_initialised_update_leaves_output_unchanged(name):
    from vision_ft.backbones import TimmViT

    base = TimmViT("vit_test_tiny").eval()
    task = make_task(name).eval()
    with torch.no_grad():
        ref = base(base.preprocess(X))
        out = task.backbone(task.backbone.preprocess(X))
    assert torch.equal(ref, out)


def test_unknown_method_names_the_registry():
    from vision_ft.errors import ConfigError

    with pytest.raises(ConfigError, match="Did you mean 'ssf'") as e:
        make_task("sff")
    assert "model.init_args.method" in str(e.value)


def test_adapter_from_another_backbone_is_refused(tmp_path):
    from vision_ft.errors import AdapterError
    from vision_ft.export import save_adapter
    from vision_ft.tasks import ImageClassificationTask
    import safetensors.torch as st

    save_adapter(make_task("ssf"), tmp_path)
    other = make_task("ssf", name="vit_test_small")
    with pytest.raises(AdapterError, match="shape mismatch|missing|unexpected"):
        other.load_adapter_tensors(st.load_file(tmp_path / "adapter.safetensors"))
    assert isinstance(other, ImageClassificationTask)


def test_non_mergeable_method_refuses_export(tmp_path):
    """A method that declares itself non-mergeable is refused by `export --merge`."""
    from vision_ft.errors import AdapterError
    from vision_ft.export import export_merged, save_adapter
    from vision_ft.methods import SSF, register, unregister

    @register
    class UnmergeableSSF(SSF):
        name = "ssf_unmergeable_test"
        prefix = "ssfu_test_"
        mergeable = False

        def is_trainable(self, n):
            return "ssf_" in n

    try:
        task = make_task("ssf_unmergeable_test")
        save_adapter(task, tmp_path / "run")
        with pytest.raises(AdapterError, match="cannot be merged"):
            export_merged(tmp_path / "run", tmp_path / "out")
        assert not (tmp_path / "out" / "model.safetensors").exists()
    finally:
        unregister("ssf_unmergeable_test")
