"""The transformers CLIP/SigLIP backbone: towers and roles, text from embeddings, dense features,
loading errors, native export, CLIP-LoRA merge into a transformers-loadable model, the CLIP task and CLI."""

import copy
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from vision_ft.methods import sites
import torch.nn.functional as F

import vision_ft.methods.clip_lora  # noqa: F401 - registers clip_lora
import vision_ft.methods.coop  # noqa: F401 - registers coop
from vision_ft.backbones.hf_clip import HFCLIP
from vision_ft.errors import BackboneError, ConfigError
from vision_ft.methods.clip_lora import CLIPLoRA
from vision_ft.tasks.clip_classification import CLIPClassificationTask

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["normal", "lesion", "fibrosis", "calcification"]
PROMPTS = ["a photo of a lesion.", "fibrosis", "an image of calcification, CT."]
X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
PRESETS = ["hf_clip_test_tiny", "hf_siglip_test_tiny"]


@pytest.fixture(scope="module")
def tiny():
    return {name: HFCLIP(name).eval() for name in PRESETS}


def _native_classes(family):
    from transformers import CLIPModel, SiglipModel

    return CLIPModel if family == "clip" else SiglipModel


def _logits(b, x, prompts):
    """logit_scale * cos(image, text) (+ SigLIP's bias): the full model's logits_per_image."""
    img = F.normalize(b.encode_image(b.preprocess(x)), dim=-1)
    txt = F.normalize(b.encode_text(b.tokenize(prompts)), dim=-1)
    bias = b.logit_bias()
    return b.logit_scale() * img @ txt.T + (0 if bias is None else bias)


def _perturb_lora_b(model, scale=0.5):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".clip_lora_B" in n:
                p.add_(scale * torch.randn(p.shape, generator=g))


# --- structure -------------------------------------------------------------------------
def test_blocks_are_visual_then_text_and_roles_are_the_separate_linears(tiny):
    b = tiny["hf_clip_test_tiny"]
    assert type(b.model).__name__ == "CLIPModel" and b.num_blocks == 4 and b.embed_dim == 32
    assert [b.tower(i) for i in range(4)] == ["visual", "visual", "text", "text"]
    assert [b.tower_block(i) for i in range(4)] == [0, 1, 0, 1]
    assert b.blocks[2] is b.model.text_model.encoder.layers[0]
    layer = b.model.vision_model.encoder.layers[1]
    for role, module in (("q", layer.self_attn.q_proj), ("k", layer.self_attn.k_proj), ("v", layer.self_attn.v_proj),
                         ("proj", layer.self_attn.out_proj), ("fc1", layer.mlp.fc1), ("fc2", layer.mlp.fc2)):
        site = sites.at(b, 1, role)
        assert site.host is module and site.reader is None and site.key == "" and isinstance(module, torch.nn.Linear)
    assert b.module_name(3, "fc1") == "text_model.encoder.layers.1.mlp.fc1"
    with pytest.raises(ConfigError, match="no packed qkv.*q, k, v"):
        sites.at(b, 0, "qkv")
    with pytest.raises(KeyError):
        b.module_name(0, "qkvo")
    assert b.norms(2)["norm2"] is b.model.text_model.encoder.layers[0].layer_norm2 and b.block_width(2) == 32
    assert b.stem() is b.model.vision_model.embeddings.patch_embedding
    assert b.final_norm() is b.model.vision_model.post_layernorm
    visual, text = dict(b.tower_parameters("visual")), dict(b.tower_parameters("text"))
    everything = dict(b.model.named_parameters())
    assert not visual.keys() & text.keys() and set(everything) - visual.keys() - text.keys() == {"logit_scale"}
    assert "visual_projection.weight" in visual and "text_projection.weight" in text
    s = tiny["hf_siglip_test_tiny"]
    assert type(s.model).__name__ == "SiglipModel" and s.embed_dim == 32 and s.context_length == 64
    assert set(dict(s.model.named_parameters())) - {n for t in ("visual", "text") for n, _ in
                                                     s.tower_parameters(t)} == {"logit_scale", "logit_bias"}


def test_towers_argument_restricts_the_blocks_methods_see():
    b = HFCLIP("hf_clip_test_tiny", towers=["text"])
    assert b.num_blocks == 2 and b.tower(0) == "text"
    assert b.module_name(0, "q") == "text_model.encoder.layers.0.self_attn.q_proj"
    with pytest.raises(ConfigError, match="towers"):
        HFCLIP("hf_clip_test_tiny", towers=["vision"])


def test_tiny_presets_are_seeded():
    for name in PRESETS:
        assert HFCLIP(name).fingerprint() == HFCLIP(name).fingerprint()
        assert HFCLIP(name, init_seed=1).fingerprint() != HFCLIP(name).fingerprint()


# --- text ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_text_from_embeddings_equals_encode_text(tiny, name):
    b = tiny[name]
    tokens = b.tokenize([*PROMPTS, "X X X X X X X X lesion."])
    with torch.no_grad():
        ref = b.encode_text(tokens)
        got = b.encode_text_embeddings(b.token_embedding(tokens), b.eot_indices(tokens))
    assert ref.shape == (4, b.embed_dim) and torch.allclose(ref, got, atol=1e-6)
    assert b.count_tokens("a photo of a") == 4


def test_eot_rule_follows_the_config_legacy_eos_id(tiny):
    b = tiny["hf_clip_test_tiny"]
    tokens = b.tokenize(PROMPTS)
    ends = [1 + b.count_tokens(p) for p in PROMPTS]  # [SOT] text [EOT]: the first end-of-text of each row
    assert b.eot_indices(tokens).tolist() == ends and (tokens[0, ends[0]:] == 49407).all()
    tm = b.model.text_model
    tm.eos_token_id = 2  # the OpenAI hub configs: transformers then pools at the highest id
    try:
        tokens[0, 4] = 49407  # an end-of-text mid-sentence: both rules pool there, a wrong rule would not
        with torch.no_grad():
            ref = b.encode_text(tokens)
            got = b.encode_text_embeddings(b.token_embedding(tokens), b.eot_indices(tokens))
        assert b.eot_indices(tokens).tolist() == [4, *ends[1:]] and torch.allclose(ref, got, atol=1e-6)
    finally:
        tm.eos_token_id = 49407
    siglip = tiny["hf_siglip_test_tiny"]
    assert siglip.eot_indices(siglip.tokenize(PROMPTS)).tolist() == [63, 63, 63]  # SigLIP pools the last position


def test_tokenizer_is_clip_bpe_as_open_clip_tokenizes(tiny):
    import open_clip

    ref = open_clip.SimpleTokenizer()
    tokens = tiny["hf_clip_test_tiny"].tokenize(PROMPTS + ["Naïve café: it's 12 cats!"])
    for row, text in zip(tokens.tolist(), PROMPTS + ["Naïve café: it's 12 cats!"]):
        n = len(ref.encode(text)) + 2
        assert row[:n] == [49406, *ref.encode(text), 49407] and set(row[n:]) <= {49407}


# --- image -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_features_are_the_projected_image_embedding(tiny, name):
    b = tiny[name]
    x = b.preprocess(torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(1)))
    assert x.shape == (2, 3, 32, 32)
    with torch.no_grad():
        pooled, tokens = b.features(x)
        assert torch.allclose(pooled, b.encode_image(x), atol=1e-6)
    assert pooled.shape == (2, 32) and tokens.shape == (2, 16, 32)


def test_dense_features_are_the_last_block_with_attention_restricted_to_each_token(tiny):
    b = tiny["hf_clip_test_tiny"]
    x = b.preprocess(X)
    vm = b.model.vision_model
    with torch.no_grad():
        dense = b.dense_features(x)
        # independent route: transformers' own layers, the last one with a diagonal (identity) attention mask
        h = vm.pre_layrnorm(vm.embeddings(x))
        for layer in vm.encoder.layers[:-1]:
            h = layer(h, None)
        n = h.shape[1]
        mask = torch.full((n, n), torch.finfo(h.dtype).min).fill_diagonal_(0.0).expand(2, 1, n, n)
        ref = b.model.visual_projection(vm.post_layernorm(vm.encoder.layers[-1](h, mask))[:, 1:])
        mixed = b.model.visual_projection(vm.post_layernorm(vm(pixel_values=x).last_hidden_state)[:, 1:])
    assert dense.shape == (2, 16, b.embed_dim)
    assert torch.allclose(dense, ref, atol=1e-5)
    assert not torch.allclose(dense, mixed, atol=1e-3)  # the usual attention mixes tokens: not the same


@pytest.mark.parametrize("name", PRESETS)
def test_dense_features_with_the_pooled_embedding_from_one_pass(tiny, name):
    b = tiny[name]
    x = b.preprocess(X)
    with torch.no_grad():
        pooled, dense = b.dense_features(x, return_pooled=True)
        assert torch.allclose(pooled, b.encode_image(x), atol=1e-6)
        assert torch.equal(dense, b.dense_features(x)) and dense.shape == (2, 16, 32)


@pytest.mark.parametrize("name", PRESETS)
def test_dense_features_ignore_last_block_queries_and_keys_but_follow_its_values(name):
    b = HFCLIP(name).eval()
    x = b.preprocess(X)
    attn = b.model.vision_model.encoder.layers[-1].self_attn
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        before, pooled = b.dense_features(x), b.encode_image(x)
        for lin in (attn.q_proj, attn.k_proj):
            lin.weight.add_(torch.randn(lin.weight.shape, generator=g))
        assert torch.allclose(b.dense_features(x), before, atol=1e-6)
        assert not torch.allclose(b.encode_image(x), pooled, atol=1e-4)  # the pooled path does use them
        attn.v_proj.weight.add_(torch.randn(attn.v_proj.weight.shape, generator=g))
        assert not torch.allclose(b.dense_features(x), before, atol=1e-4)


# --- loading ---------------------------------------------------------------------------
def test_loading_errors_name_the_key(tmp_path, tiny):
    with pytest.raises(BackboneError, match="backbone.init_args.name"):
        HFCLIP("no-such-org/not-a-clip-model")
    with pytest.raises(BackboneError, match="backbone.init_args.checkpoint"):
        HFCLIP("hf_clip_test_tiny", checkpoint=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="backbone.init_args.checkpoint.*config.json"):
        HFCLIP("hf_clip_test_tiny", checkpoint=str(tmp_path / "empty"))
    tiny["hf_siglip_test_tiny"].save_native(tmp_path / "siglip")
    with pytest.raises(BackboneError, match="does not fit"):
        HFCLIP("hf_clip_test_tiny", checkpoint=str(tmp_path / "siglip"))
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in tiny["hf_clip_test_tiny"].model.state_dict().items()}
    state["text_model.final_layer_norm.weight"] = torch.ones(48)  # another width
    save_file(state, str(tmp_path / "other.safetensors"))
    with pytest.raises(BackboneError, match="does not fit"):
        HFCLIP("hf_clip_test_tiny", checkpoint=str(tmp_path / "other.safetensors"))
    with pytest.raises(BackboneError, match="backbone.init_args.pretrained"):
        HFCLIP("hf_clip_test_tiny", pretrained=True)


def test_offline_pretrained_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="backbone.init_args.checkpoint"):
        HFCLIP("openai/clip-vit-base-patch16", pretrained=True)


def test_state_dict_file_checkpoint_loads(tmp_path, tiny):
    from safetensors.torch import save_file

    ref = tiny["hf_clip_test_tiny"]
    save_file({k: v.contiguous() for k, v in ref.model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    again = HFCLIP("hf_clip_test_tiny", checkpoint=str(tmp_path / "w.safetensors"), init_seed=3)
    assert again.fingerprint() == ref.fingerprint() and again.weights_source.startswith("local checkpoint")
    larger = HFCLIP("hf_clip_test_tiny", checkpoint=str(tmp_path / "w.safetensors"), image_size=48)
    assert larger.model.vision_model.embeddings.position_embedding.weight.shape == (37, 32)  # 6 x 6 patches + class


# --- native export ---------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_native_export_loads_in_transformers_with_tokenizer_and_processor(tiny, tmp_path, name):
    from transformers import AutoImageProcessor, AutoTokenizer

    b = tiny[name]
    out = b.save_native(tmp_path / "native", extra={"class_names": NAMES})
    native = _native_classes(b.family).from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    processor = AutoImageProcessor.from_pretrained(out)
    assert tuple(processor.image_mean) == pytest.approx(b.mean) and tuple(processor.image_std) == pytest.approx(b.std)
    ids = tokenizer(PROMPTS, padding="max_length", max_length=b.context_length, return_tensors="pt").input_ids
    assert torch.equal(ids, b.tokenize(PROMPTS))
    x = b.preprocess(X)
    with torch.no_grad():
        assert torch.equal(native.get_image_features(pixel_values=x).pooler_output, b.encode_image(x))
        assert torch.equal(native.get_text_features(input_ids=ids).pooler_output, b.encode_text(ids))
        assert torch.allclose(native(input_ids=ids, pixel_values=x).logits_per_image, _logits(b, X, PROMPTS),
                              atol=1e-5)
    assert json.loads((out / "vision_ft_native.json").read_text())["class_names"] == NAMES
    again = HFCLIP(name, checkpoint=str(out), init_seed=5)
    assert again.fingerprint() == b.fingerprint() and again.weights_source.startswith("local checkpoint")
    assert again.tokenizer_source.startswith("AutoTokenizer") and again.mean == b.mean
    if b.family == "siglip":
        return
    hub = HFCLIP(str(out), pretrained=True)  # the from_pretrained path (a local folder stands in for a hub id)
    assert hub.fingerprint() == b.fingerprint() and hub.tokenizer_source.startswith("AutoTokenizer")
    assert hub.weights_source.startswith("pretrained") and (hub.mean, hub.std) == (b.mean, b.std)


def test_image_size_override_resamples_positions_and_exports_at_the_new_size(tiny, tmp_path):
    from transformers import CLIPModel

    tiny["hf_clip_test_tiny"].save_native(tmp_path / "a")
    b = HFCLIP("hf_clip_test_tiny", checkpoint=str(tmp_path / "a"), image_size=48).eval()
    assert b.input_size == (48, 48) and b.model.config.vision_config.image_size == 48
    x = b.preprocess(X)
    assert x.shape[-1] == 48
    b.save_native(tmp_path / "b")
    native = CLIPModel.from_pretrained(tmp_path / "b").eval()
    with torch.no_grad():
        assert torch.equal(native.get_image_features(pixel_values=x).pooler_output, b.encode_image(x))
        assert b.dense_features(x).shape == (2, 36, 32)


# --- CLIP-LoRA -------------------------------------------------------------------------
def test_clip_lora_count_on_the_vit_b16_architecture_is_184320():
    from transformers import CLIPConfig

    # openai/clip-vit-base-patch16 sizes, written by hand (no download)
    ref = CLIPConfig(projection_dim=512,
                     text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                                      num_attention_heads=8, max_position_embeddings=77),
                     vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, image_size=224, patch_size=16))
    b = HFCLIP("openai/clip-vit-base-patch16")
    for part in ("text_config", "vision_config"):
        got, want = getattr(b.model.config, part), getattr(ref, part)
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            assert getattr(got, key) == getattr(want, key), (part, key)
    assert b.model.config.vision_config.patch_size == 16 and b.model.config.projection_dim == 512
    method = CLIPLoRA()
    method.apply(b)
    # 2 * (768 + 768) * 3 * 12 (visual) + 2 * (512 + 512) * 3 * 12 (text)
    assert method.trainable_parameters(b) == 184_320


@pytest.mark.parametrize("name", PRESETS)
def test_clip_lora_is_zero_at_init_and_its_merge_reloads_in_transformers_with_the_same_logits(name, tmp_path):
    base = HFCLIP(name).eval()
    base.requires_grad_(False)  # frozen like the adapted base (PyTorch's attention kernel depends on requires_grad)
    b = HFCLIP(name).eval()
    keys = set(b.model.state_dict())
    method = CLIPLoRA()
    method.apply(b)
    trainable = [n for n, p in b.model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 3 * 4 and all(".self_attn." in n and "_proj.clip_lora_" in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(_logits(base, X, PROMPTS), _logits(b, X, PROMPTS))  # B = 0: the base model
        _perturb_lora_b(b.model)
        adapted = _logits(b, X, PROMPTS)
        assert not torch.allclose(adapted, _logits(base, X, PROMPTS), atol=1e-3)
        method.merge(b)
    assert set(b.model.state_dict()) == keys and not sites.owned(b.model, "clip_lora_")
    out = b.save_native(tmp_path / "merged")
    from transformers import AutoTokenizer

    native = _native_classes(b.family).from_pretrained(out).eval()
    ids = AutoTokenizer.from_pretrained(out)(PROMPTS, padding="max_length", max_length=b.context_length,
                                             return_tensors="pt").input_ids
    with torch.no_grad():
        logits = native(input_ids=ids, pixel_values=b.preprocess(X)).logits_per_image
    assert torch.allclose(logits, adapted, atol=1e-5, rtol=0)


def test_adapter_roundtrip_and_merged_export_load_in_transformers(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, CLIPModel

    from vision_ft.export import export_merged, load_adapter, save_adapter

    templates = ["a photo of a {}.", "a {} image."]
    task = CLIPClassificationTask(HFCLIP("hf_clip_test_tiny"), method="clip_lora", num_classes=4,
                                  class_names=NAMES, templates=templates).eval()
    _perturb_lora_b(task.backbone.model)
    task._cache.clear()
    save_adapter(task, tmp_path / "run")
    loaded = load_adapter(tmp_path / "run")  # rebuilt from spec(), fingerprint checked
    with torch.no_grad():
        expected = task(X)
        assert torch.equal(expected, loaded(X))
    out = export_merged(tmp_path / "run", tmp_path / "out")
    meta = json.loads((out / "vision_ft_native.json").read_text())
    native, tokenizer = CLIPModel.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    with torch.no_grad():  # the zero-shot head rebuilt with transformers alone
        ids = tokenizer([t.format(n) for n in meta["class_names"] for t in meta["templates"]], padding="max_length",
                        max_length=77, return_tensors="pt").input_ids
        text = F.normalize(native.get_text_features(input_ids=ids).pooler_output, dim=-1).view(4, 2, -1).mean(1)
        text = F.normalize(text, dim=-1)
        image = F.normalize(native.get_image_features(pixel_values=task.backbone.preprocess(X)).pooler_output, dim=-1)
        logits = native.logit_scale.exp() * image @ text.T
    assert torch.allclose(logits, expected, atol=1e-4)
    assert torch.allclose(load_file(out / "class_text_features.safetensors")["text_features"], text, atol=1e-5)


def test_grad_checkpointing_gives_the_same_lora_gradients():
    grads = []
    for checkpointing in (False, True):
        b = HFCLIP("hf_clip_test_tiny", grad_checkpointing=checkpointing).train()
        torch.manual_seed(0)  # the same A factors in both models
        CLIPLoRA(dropout=0.0).apply(b)
        _perturb_lora_b(b.model)
        x = b.preprocess(X)
        (b.encode_image(x).square().sum() + b.encode_text(b.tokenize(PROMPTS)).square().sum()).backward()
        grads.append({n: p.grad for n, p in b.model.named_parameters() if p.requires_grad})
        assert b.model.vision_model.encoder.layers[0].gradient_checkpointing is checkpointing
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 24
    for n, g in grads[0].items():
        assert g.abs().sum() > 0 and torch.allclose(g, grads[1][n], atol=1e-6), n


# --- task, CoOp, CLI -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["hf_clip_test_tiny", pytest.param("hf_siglip_test_tiny", marks=pytest.mark.slow)])
def test_clip_task_runs_a_fit_step_and_the_lora_factors_move(name, tmp_path):
    task = CLIPClassificationTask(HFCLIP(name), method="clip_lora", num_classes=4, class_names=NAMES)
    g = torch.Generator().manual_seed(0)
    items = [{"image": torch.rand(3, 32, 32, generator=g), "label": torch.tensor(i % 4)} for i in range(8)]
    loader = torch.utils.data.DataLoader(items, batch_size=4)
    trainer = pl.Trainer(fast_dev_run=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(task, train_dataloaders=loader, val_dataloaders=loader)
    lora_b = [p for n, p in task.backbone.model.named_parameters() if ".clip_lora_B" in n]
    assert lora_b and all(torch.isfinite(p).all() for p in lora_b)
    assert any(p.abs().sum() > 0 for p in lora_b)  # one optimiser step moved the zero-initialised factors
    with torch.no_grad():
        assert task.eval()(X).shape == (2, 4)


def test_coop_from_the_hand_crafted_words_reproduces_the_prompt(tiny):
    from vision_ft.methods.coop import CoOp

    b = copy.deepcopy(tiny["hf_clip_test_tiny"])
    method = CoOp(ctx_init="a photo of a")
    method.apply(b)
    assert method.n_ctx == 4 and b.model.coop_ctx.shape == (4, 32)
    with torch.no_grad():
        got = method.class_text_features(b, NAMES)
        ref = b.encode_text(b.tokenize([f"a photo of a {n}." for n in NAMES]))
    assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.slow  # tests/test_cli.py already runs this fragment on the CLIP config in the default suite
def test_cli_fit_with_the_backbone_fragment(tmp_path, monkeypatch, caplog):
    from vision_ft.cli import main

    calls = []
    encode = HFCLIP.encode_image
    monkeypatch.setattr(HFCLIP, "encode_image", lambda self, x: calls.append(x.shape) or encode(self, x))
    fragment = ROOT / "configs" / "backbones" / "hf_clip_test_tiny.yaml"
    assert "requires: clip" in fragment.read_text()  # tests/test_cli.py stacks it on the CLIP config
    code = main(["fit", "--config", str(ROOT / "domains" / "clip_few_shot.yaml"), "--config", str(fragment),
                 "--trainer.fast_dev_run=true", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
                 f"--data.init_args.sample_dir={tmp_path / 'sample'}", "--trainer.enable_progress_bar=false",
                 "--trainer.enable_model_summary=false"])
    assert code == 0
    assert calls and calls[0][-2:] == (32, 32)  # the HFCLIP backbone named by the fragment ran
    assert "random init" in caplog.text and "1,536 trainable backbone parameters" in caplog.text
