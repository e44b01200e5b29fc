"""The open_clip backbone: both towers behind the Backbone surface, packed q/k/v, loading and native export."""

import pytest
import torch

from vision_ft.backbones.open_clip import OpenCLIP
from vision_ft.methods import sites
from vision_ft.errors import BackboneError, ConfigError

X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny():
    return OpenCLIP("open_clip_test_tiny").eval()


def test_blocks_are_visual_then_text_and_roles_resolve(tiny):
    assert tiny.num_blocks == 4
    assert [tiny.tower(i) for i in range(4)] == ["visual", "visual", "text", "text"]
    assert [tiny.tower_block(i) for i in range(4)] == [0, 1, 0, 1]
    assert tiny.blocks[2] is tiny.model.transformer.resblocks[0]
    assert tiny.module_name(3, "fc1") == "transformer.resblocks.1.mlp.c_fc"
    assert isinstance(sites.at(tiny, 0, "fc2").host, torch.nn.Linear) and sites.at(tiny, 0, "fc2").reader is None
    mha = tiny.model.visual.transformer.resblocks[1].attn
    for i, role in enumerate("qkv"):
        site = sites.at(tiny, 1, role)
        assert site.host is mha and site.reader is mha and site.key == role
        assert torch.equal(site.weight, mha.in_proj_weight[32 * i:32 * (i + 1)])
        assert site.weight.data_ptr() == mha.in_proj_weight[32 * i].data_ptr()  # a view, not a copy
    proj = sites.at(tiny, 1, "proj")
    assert proj.host is mha.out_proj and proj.reader is mha and proj.out_features == 32


def test_towers_argument_restricts_the_blocks_methods_see():
    b = OpenCLIP("open_clip_test_tiny", towers=["text"])
    assert b.num_blocks == 2 and b.tower(0) == "text"
    assert b.module_name(0, "q") == "transformer.resblocks.0.attn"
    with pytest.raises(ConfigError, match="towers"):
        OpenCLIP("open_clip_test_tiny", towers=["vision"])


def test_text_from_embeddings_equals_encode_text(tiny):
    tokens = tiny.tokenize(["a photo of a lesion.", "fibrosis"])
    with torch.no_grad():
        ref = tiny.encode_text(tokens)
        got = tiny.encode_text_embeddings(tiny.token_embedding(tokens), tiny.eot_indices(tokens))
    assert torch.allclose(ref, got, atol=1e-6)
    assert tiny.count_tokens("a photo of a") == 4


def test_features_are_the_projected_image_embedding(tiny):
    with torch.no_grad():
        pooled, tokens = tiny.features(tiny.preprocess(X))
        assert torch.equal(pooled, tiny.encode_image(tiny.preprocess(X)))
    assert pooled.shape == (2, tiny.embed_dim) and tokens.shape == (2, 16, 32)
    assert tiny.model.visual.output_tokens is False  # restored after features()


def test_native_export_loads_in_open_clip_and_as_checkpoint(tiny, tmp_path):
    import open_clip

    tiny.save_native(tmp_path / "oc")
    native = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    again = OpenCLIP("open_clip_test_tiny", checkpoint=str(tmp_path / "oc"), init_seed=5)
    assert again.fingerprint() == tiny.fingerprint() and again.weights_source.startswith("local checkpoint")
    x = tiny.preprocess(X)
    with torch.no_grad():
        assert torch.equal(native.encode_image(x), tiny.encode_image(x))
        tokens = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")(["a photo of a lesion."])
        assert torch.equal(native.encode_text(tokens), tiny.encode_text(tokens))


def test_random_init_is_seeded():
    assert OpenCLIP("open_clip_test_tiny").fingerprint() == OpenCLIP("open_clip_test_tiny").fingerprint()
    assert OpenCLIP("open_clip_test_tiny", init_seed=1).fingerprint() != OpenCLIP("open_clip_test_tiny").fingerprint()


def test_loading_errors_name_the_key(tmp_path):
    with pytest.raises(BackboneError, match="backbone.init_args.name"):
        OpenCLIP("ViT-Nope-99")
    with pytest.raises(BackboneError, match="backbone.init_args.checkpoint"):
        OpenCLIP("open_clip_test_tiny", checkpoint=str(tmp_path / "missing.safetensors"))
    from safetensors.torch import save_file

    state = OpenCLIP("open_clip_test_tiny").model.state_dict()
    state["ln_final.weight"] = torch.ones(48)  # another width
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(BackboneError, match="does not fit"):
        OpenCLIP("open_clip_test_tiny", checkpoint=str(tmp_path / "other.safetensors"))
    with pytest.raises(BackboneError, match="backbone.init_args.pretrained"):
        OpenCLIP("open_clip_test_tiny", pretrained="openai")


def test_offline_pretrained_tag_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="backbone.init_args.checkpoint"):
        OpenCLIP("ViT-B-32", pretrained="laion2b_s34b_b79k")


def test_dense_features_are_the_last_block_with_self_only_attention_then_ln_post_and_proj():
    backbone = OpenCLIP("open_clip_test_tiny").eval()
    x = backbone.preprocess(X)
    with torch.no_grad():
        pooled, dense = backbone.dense_features(x, return_pooled=True)
        visual = backbone.model.visual
        last = visual.transformer.resblocks[-1]
        assert not last._forward_pre_hooks  # the capture hook is gone
        assert torch.equal(pooled, backbone.encode_image(x))
        grabbed = []
        handle = last.register_forward_pre_hook(lambda m, a: grabbed.append(a[0]))
        backbone.encode_image(x)
        handle.remove()
        tokens = grabbed[0]
        mask = torch.full((tokens.shape[1],) * 2, float("-inf"))
        mask.fill_diagonal_(0.0)
        ref = visual.ln_post(last(tokens, attn_mask=mask))[:, 1:] @ visual.proj
        ordinary = backbone.features(x)[1] @ visual.proj
        again = backbone.dense_features(x)
    assert dense.shape == (2, 16, 32)  # (32 / 8)^2 patches, class token dropped, joint space
    assert torch.allclose(dense, ref, atol=1e-5)
    assert not torch.allclose(dense, ordinary, atol=1e-3)
    assert torch.equal(again, dense)
