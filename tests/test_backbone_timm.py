import pytest
import timm
import torch
from safetensors.torch import save_file

from vision_ft.backbones import TimmViT
from vision_ft.methods import sites
from vision_ft.backbones.timm_vit import TINY_PRESETS
from vision_ft.errors import BackboneError


def _tiny_timm(num_classes=0, seed=1):
    arch, args = TINY_PRESETS["vit_test_tiny"]
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **args)


def test_local_checkpoint_file_loads_through_timm(tmp_path):
    ref = _tiny_timm(num_classes=7)  # a checkpoint with a head of another size
    save_file(ref.state_dict(), tmp_path / "w.safetensors")
    bb = TimmViT("vit_test_tiny", checkpoint=str(tmp_path / "w.safetensors"))
    assert torch.equal(bb.model.blocks[1].mlp.fc2.weight, ref.blocks[1].mlp.fc2.weight)
    assert "local checkpoint" in bb.weights_source
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(bb(bb.preprocess(x)), ref.forward_head(ref.forward_features(bb.preprocess(x)), pre_logits=True))


def test_local_checkpoint_folder_and_torch_file(tmp_path):
    ref = _tiny_timm()
    save_file(ref.state_dict(), tmp_path / "model.safetensors")
    assert torch.equal(TimmViT("vit_test_tiny", checkpoint=str(tmp_path)).model.cls_token, ref.cls_token)
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    assert torch.equal(TimmViT("vit_test_tiny", checkpoint=str(tmp_path / "w.pth")).model.cls_token, ref.cls_token)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    arch, args = TINY_PRESETS["vit_test_small"]
    save_file(timm.create_model(arch, num_classes=0, **args).state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(BackboneError, match="does not fit backbone 'vit_test_tiny'"):
        TimmViT("vit_test_tiny", checkpoint=str(tmp_path / "w.safetensors"))


def test_missing_checkpoint_names_the_key(tmp_path):
    with pytest.raises(BackboneError, match="backbone.init_args.checkpoint"):
        TimmViT("vit_test_tiny", checkpoint=str(tmp_path / "nope.safetensors"))


def test_pretrained_offline_names_checkpoint_key():
    with pytest.raises(BackboneError, match="backbone.init_args.checkpoint"):
        TimmViT("vit_test_tiny", pretrained=True)


def test_unknown_architecture():
    with pytest.raises(BackboneError, match="unknown timm architecture"):
        TimmViT("vit_hyper_patch3_999")


def test_random_init_is_reproducible_and_seeded():
    a, b, c = TimmViT("vit_test_tiny"), TimmViT("vit_test_tiny"), TimmViT("vit_test_tiny", init_seed=1)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert "random init" in a.weights_source


def test_roles_expose_fused_qkv_as_slices():
    bb = TimmViT("vit_test_tiny")
    qkv = sites.at(bb, 0, "qkv")
    q, v = sites.at(bb, 0, "q"), sites.at(bb, 0, "v")
    assert q.host is qkv.host is bb.model.blocks[0].attn.qkv and (qkv.key, q.key) == ("", "q")
    assert (q.start, q.stop, v.start, v.stop) == (0, 32, 64, 96) and q.name == "blocks.0.attn.qkv[q]"
    assert q.weight.data_ptr() == qkv.host.weight.data_ptr()  # a view, not a copy
    assert bb.module_name(1, "fc1") == "blocks.1.mlp.fc1"
    assert bb.num_blocks == 2 and bb.embed_dim == 32
    with pytest.raises(KeyError):
        bb.module_name(0, "gate")


def test_preprocess_resizes_and_normalises():
    bb = TimmViT("vit_test_tiny")
    x = bb.preprocess(torch.ones(1, 3, 50, 40))
    assert x.shape == (1, 3, 32, 32)
    assert torch.allclose(x, torch.ones_like(x))  # (1 - 0.5) / 0.5
