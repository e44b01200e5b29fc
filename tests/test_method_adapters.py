"""Sequential adapter (Houlsby) and AdaptFormer: placement, zero init, counts, config errors."""

import copy

import pytest
import torch
import torch.nn.functional as F

import vision_ft.methods.adapters  # noqa: F401 - registers adapter, adaptformer
from conftest import make_task
from vision_ft.backbones import TimmViT
from vision_ft.errors import AdapterError, ConfigError
from vision_ft.methods.adapters import AdaptFormer, Adapter, Bottleneck

X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
TOKENS = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(1))  # vit_test_tiny: 16 patches + cls


def _randomise(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Move every adapter tensor away from init (Up = 0 would hide the adapter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))


def _applied(method, **backbone_kw):
    backbone = TimmViT("vit_test_tiny", **backbone_kw).eval()
    method.apply(backbone)
    return backbone


def _bottleneck(a: Bottleneck, x: torch.Tensor, act) -> torch.Tensor:
    return a.scale * a.up(act(a.down(a.norm(x))))


@pytest.mark.parametrize("positions", [["mlp"], ["attn", "mlp"]])
def test_adapter_sits_on_the_sublayer_output_before_the_residual_add(positions):
    backbone = _applied(Adapter(positions=positions))
    base = TimmViT("vit_test_tiny").eval()  # same init seed: identical frozen weights, no hooks
    block, ref = backbone.model.blocks[0], base.model.blocks[0]
    for pos in positions:
        _randomise(getattr(block, f"adapter_{pos}"), seed=len(pos))
    with torch.no_grad():
        out = block(TOKENS)
        h = ref.attn(ref.norm1(TOKENS))
        if "attn" in positions:
            h = h + _bottleneck(block.adapter_attn, h, F.gelu)
        x = TOKENS + h
        h = ref.mlp(ref.norm2(x))
        expected = x + h + _bottleneck(block.adapter_mlp, h, F.gelu)
        after_add = (x + h) + _bottleneck(block.adapter_mlp, x + h, F.gelu)  # the other reading
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out, after_add, atol=1e-4)


@pytest.mark.parametrize("layernorm", [False, True])
def test_adaptformer_reads_the_residual_stream_after_attention(layernorm):
    """x <- x + MLP(LN2 x) + s * Up(ReLU(Down(x))): input x, not LN2 x (official Block.forward)."""
    backbone = _applied(AdaptFormer(layernorm=layernorm))
    base = TimmViT("vit_test_tiny").eval()
    block, ref = backbone.model.blocks[0], base.model.blocks[0]
    adapter = block.adaptformer_adapter
    _randomise(adapter)
    assert isinstance(adapter.norm, torch.nn.LayerNorm) == layernorm
    with torch.no_grad():
        out = block(TOKENS)
        x = TOKENS + ref.attn(ref.norm1(TOKENS))
        mlp = ref.mlp(ref.norm2(x))
        expected = x + mlp + 0.1 * adapter.up(F.relu(adapter.down(adapter.norm(x))))
        reading_ln2 = x + mlp + 0.1 * adapter.up(F.relu(adapter.down(adapter.norm(ref.norm2(x)))))
    assert torch.allclose(out, expected, atol=1e-6)
    if not layernorm:  # LN_a(LN2 x) == LN_a(x) while LN2 is the identity affine of a fresh ViT
        assert not torch.allclose(out, reading_ln2, atol=1e-4)
    assert adapter.pending is None, "the captured activation must not outlive the forward"


def test_adaptformer_branch_is_outside_the_mlp_drop_path():
    """Drop-path rate 1 on the last block: only the adapter branch survives (official: added after drop_path)."""
    backbone = _applied(AdaptFormer(dropout=0.0), drop_path_rate=1.0)  # block 1 of 2 gets rate 1.0
    block = backbone.model.blocks[1].train()
    adapter = block.adaptformer_adapter
    _randomise(adapter)
    with torch.no_grad():
        out = block(TOKENS)
    assert torch.allclose(out, TOKENS + _bottleneck(adapter, TOKENS, F.relu), atol=1e-6)
    assert not torch.allclose(out, TOKENS, atol=1e-4)


@pytest.mark.parametrize("method", [Adapter(positions=["attn", "mlp"]), AdaptFormer(layernorm=True)],
                         ids=["houlsby", "adaptformer_ln"])
def test_non_default_variants_are_the_base_model_at_init(method):
    base = TimmViT("vit_test_tiny").eval()
    backbone = _applied(method)
    with torch.no_grad():
        assert torch.equal(base(base.preprocess(X)), backbone(backbone.preprocess(X)))


@pytest.mark.parametrize("method, count", [
    (Adapter(), 156_768),                                # 12 * (2*768*8 + 8 + 768): "Adapter-8", 0.16M
    (Adapter(positions=["attn", "mlp"]), 313_536),       # two per block (Houlsby)
    (AdaptFormer(), 1_189_632),                          # 12 * (2*768*64 + 64 + 768): AdaptFormer-64
    (AdaptFormer(layernorm=True), 1_208_064),            # + LN (2*768) per block: MoSA's merged size
], ids=["adapter8", "houlsby8", "adaptformer64", "adaptformer64_ln"])
def test_trainable_count_on_vit_base(method, count):
    backbone = TimmViT("vit_base_patch16_224")
    method.apply(backbone)
    assert method.trainable_parameters(backbone) == count


@pytest.mark.parametrize("name", ["adapter", "adaptformer"])
def test_merge_is_refused_and_leaves_the_model_as_is(name):
    task = make_task(name).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in task.backbone.model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        before = task(X)
        with pytest.raises(AdapterError, match="cannot be merged"):
            task.method.merge(task.backbone)
        assert torch.equal(before, task(X))


@pytest.mark.parametrize("cls, kwargs, key", [
    (Adapter, {"bottleneck": 0}, "bottleneck"),
    (Adapter, {"positions": ["ffn"]}, "positions"),
    (Adapter, {"positions": []}, "positions"),
    (Adapter, {"activation": "tanh"}, "activation"),
    (AdaptFormer, {"bottleneck": -4}, "bottleneck"),
    (AdaptFormer, {"dropout": 1.0}, "dropout"),
])
def test_bad_config_names_the_key(cls, kwargs, key):
    with pytest.raises(ConfigError, match=f"model.init_args.method.init_args.{key}"):
        cls(**kwargs)


@pytest.mark.parametrize("name", ["adapter", "adaptformer"])
def test_deepcopy_binds_the_hooks_to_the_copied_adapters(name):
    task = make_task(name).eval()
    clone = copy.deepcopy(task)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        before = task(X)
        for p in clone.backbone.model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
        assert torch.equal(task(X), before), "editing the copy changed the original"
        assert not torch.allclose(clone(X), before, atol=1e-4), "the copy's hooks use the original adapters"


def test_grad_checkpointing_gives_the_same_output_and_gradients():
    """The LN2-input capture and the block hook also hold when timm recomputes blocks."""
    from vision_ft.tasks import ImageClassificationTask

    results = []
    for gc in (False, True):
        torch.manual_seed(1)  # head init
        task = ImageClassificationTask(TimmViT("vit_test_tiny", grad_checkpointing=gc),
                                       method=AdaptFormer(), num_classes=3).train()
        for block in task.backbone.model.blocks:
            _randomise(block.adaptformer_adapter, seed=2)
        torch.manual_seed(0)  # adapter dropout draws
        out = task(X)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in task.named_parameters() if p.grad is not None}))
    (o1, g1), (o2, g2) = results
    assert torch.equal(o1, o2)
    assert g1.keys() == g2.keys() and any("adaptformer_adapter.down" in k for k in g1)
    assert all(torch.allclose(g1[k], g2[k], atol=1e-6) for k in g1)
