"""Vision-language models: presets of every family, label masks, bad input, parts trained in full, export."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from vision_ft.backbones import VisionLanguageModel
from vision_ft.data.chat import IGNORE
from vision_ft.data.conversations import collate_vl, encode, parse_record, read_records
from vision_ft.errors import ConfigError, DataError

FAMILIES = ["qwen2_vl_test_tiny", "qwen2_5_vl_test_tiny", "qwen3_vl_test_tiny", "llava_test_tiny",
            "llava_onevision_test_tiny"]
END = {"llava_test_tiny": "<|im_end|>\n"}
RECORD = {"images": ["a.png", "b.png"], "conversations": [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A polyp."},
    {"from": "human", "value": "And <image> this one?"}, {"from": "gpt", "value": "Normal mucosa."}]}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((90, 120, 3)) * 255).astype("uint8")).save(root / "a.png")
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(root / "b.png")
    Image.fromarray((rng.random((8, 8, 3)) * 255).astype("uint8")).save(root / "tiny.png")
    return root


@pytest.fixture(scope="module")
def models() -> dict[str, VisionLanguageModel]:
    return {name: VisionLanguageModel(name) for name in FAMILIES}


def _runs(tok, ids, labels) -> list[str]:
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


@pytest.mark.parametrize("name", FAMILIES)
def test_supervised_tokens_are_the_replies_and_image_tokens_match(models, images, name):
    vlm = models[name]
    sample = encode(vlm.processor, parse_record(RECORD, "f.jsonl:1", images))
    runs = _runs(vlm.tokenizer, sample["input_ids"].tolist(), sample["labels"].tolist())
    # every supervised run is one reply and its end-of-turn (LLaVA's "ASSISTANT: " space merges into the reply)
    assert [r.lstrip(" ") for r in runs] == ["A polyp.<|im_end|>\n", "Normal mucosa.<|im_end|>\n"]
    image_id = vlm.tokenizer.convert_tokens_to_ids(vlm.processor.image_token)
    assert not (sample["labels"] == image_id).any()  # image tokens are never learned
    last = encode(vlm.processor, parse_record(RECORD, "f.jsonl:1", images), train_on="last")
    assert [r.lstrip(" ") for r in _runs(vlm.tokenizer, last["input_ids"].tolist(), last["labels"].tolist())] == \
        ["Normal mucosa.<|im_end|>\n"]
    batch = collate_vl([sample, last], vlm.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = vlm(**{k: v for k, v in batch.items() if k != "labels"})
    assert logits.shape[:2] == batch["input_ids"].shape


def test_qwen_batches_need_mm_token_type_ids(models, images):
    vlm = models["qwen2_5_vl_test_tiny"]
    sample = encode(vlm.processor, parse_record(RECORD, "f.jsonl:1", images))
    batch = collate_vl([sample], vlm.tokenizer.pad_token_id)
    del batch["mm_token_type_ids"], batch["labels"]
    with pytest.raises(ConfigError, match="mm_token_type_ids"):
        vlm(**batch)


def test_parts_towers_and_roles(models):
    q, llava = models["qwen2_5_vl_test_tiny"], models["llava_test_tiny"]
    assert q.part_of("model.visual.merger.mlp.0.weight") == "projector"
    assert q.part_of("model.visual.blocks.0.attn.qkv.weight") == "vision_tower"
    assert q.part_of("lm_head.weight") == "language_model"
    assert llava.part_of("model.multi_modal_projector.linear_1.weight") == "projector"
    v = q.tower_blocks("vision")[0]
    assert q.weight_ref(v, "k").key == "k" and q.weight_ref(v, "k").module.endswith("attn.qkv")
    assert llava.weight_ref(llava.tower_blocks("vision")[0], "k").module.endswith("self_attn.k_proj")
    from vision_ft.methods import build_method

    names = build_method("lora").target_names(q)
    assert names and all(n.startswith("model.language_model.") for n in names)  # LLM only by default
    vision = build_method({"class_path": "vision_ft.methods.LoRA",
                           "init_args": {"targets": ["qkv", "fc2"], "towers": ["vision"]}}).target_names(q)
    assert vision and all(n.startswith("model.visual.blocks.") for n in vision)


@pytest.mark.parametrize("record,message", [
    ({"images": ["a.png"], "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]},
     "0 <image> tag\\(s\\) but 1 image"),
    ({"conversations": [{"from": "robot", "value": "hi"}]}, "unknown speaker 'robot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     "turn 1 is an empty assistant turn"),
    ({"images": ["missing.png"], "conversations": [{"from": "human", "value": "<image>"},
                                                    {"from": "gpt", "value": "x"}]}, "missing.png not found"),
])
def test_bad_records_name_file_and_line(images, tmp_path, record, message):
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n{broken\n")
    with pytest.raises(DataError, match=f"c.jsonl:2: .*{message}"):
        read_records(f, images)
    convs, skipped = read_records(f, images, on_bad="skip")
    assert len(convs) == 1 and len(skipped) == 2 and "c.jsonl:3: not valid JSON" in skipped[1]


def test_image_smaller_than_a_patch_is_refused(models, images):
    rec = {"images": ["tiny.png"], "conversations": [{"from": "human", "value": "<image>"},
                                                      {"from": "gpt", "value": "x"}]}
    with pytest.raises(DataError, match="smaller than one patch"):
        encode(models["qwen2_vl_test_tiny"].processor, parse_record(rec, "f:1", images))


def _write_data(root: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(1)
    records = []
    for i in range(n):
        colour = ["red", "green", "blue"][i % 3]
        arr = np.zeros((64, 64, 3), dtype=np.uint8)
        arr[..., i % 3] = 200 + rng.integers(0, 50)
        Image.fromarray(arr).save(root / f"img{i}.png")
        records.append({"image": f"img{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhich colour?"}, {"from": "gpt", "value": colour}]})
    if n > 2:
        records.append({"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_train_with_a_part_in_full_and_export_loads_in_transformers_alone(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vision_ft.data import ConversationData
    from vision_ft.export import export_merged
    from vision_ft.tasks import VisionLanguageSFTTask

    L.seed_everything(0)
    data_path = _write_data(tmp_path)
    task = VisionLanguageSFTTask(VisionLanguageModel("qwen2_5_vl_test_tiny"), method="lora", train_full=["projector"],
                                 part_lr={"projector": 1e-3}, lr=5e-3, max_new_tokens=6)
    groups = {g["name"]: g["lr"] for g in task.param_groups()}
    assert groups["projector"] == 1e-3 and groups["language_model"] == 5e-3
    before = {n: p.detach().clone() for n, p in task.backbone.model.named_parameters()}
    data = ConversationData(train=str(data_path), batch_size=4, val_fraction=0.2)
    trainer = L.Trainer(max_steps=3, logger=L.pytorch.loggers.CSVLogger(str(tmp_path), name="run"),
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(task, datamodule=data)
    trainer.test(task, datamodule=data, verbose=False)
    run = task.run_dir
    changed = {n for n, p in task.backbone.model.named_parameters()
               if not task.method.is_own(n) and not torch.equal(p, before[n])}
    assert changed and all(task.backbone.part_of(n) == "projector" for n in changed)  # frozen parts untouched
    meta = json.loads((run / "adapter.json").read_text())
    assert meta["trainable_report"]["projector"]["trainable"] == meta["trainable_report"]["projector"]["total"]
    assert "test/exact_match" in meta["metrics"]
    preds = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    assert preds and {"prompt", "reference", "answer"} <= set(preds[0])

    conv = data.splits["test"][0]
    task.eval()
    inputs, _ = task.prompt_inputs(conv)
    with torch.no_grad():
        want = task.backbone.model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True,
                                            pad_token_id=task.backbone.tokenizer.pad_token_id)
    out = export_merged(run, tmp_path / "merged")
    model = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    assert processor.tokenizer.chat_template == task.backbone.tokenizer.chat_template
    again = {k: v for k, v in processor(text=[task.backbone.tokenizer.apply_chat_template(
        conv.messages[:1], tokenize=False, add_generation_prompt=True)], images=[Image.open(conv.images[0])],
        return_tensors="pt").items()}
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        got = model.generate(**again, max_new_tokens=8, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    assert torch.equal(got, want)  # the exported model (projector trained in full + merged LoRA) decodes the same
    merger = dict(model.named_parameters())["model.visual.merger.mlp.0.weight"]
    assert torch.equal(merger, dict(task.backbone.model.named_parameters())["model.visual.merger.mlp.0.weight"])


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_exports_a_merged_folder_that_decodes_the_same_tokens(tmp_path, name):
    """LoRA on the language model plus the projector in full, one optimiser step at a high rate, then
    ``export --merge``: transformers' Auto classes alone load it and greedy-decode what the run decodes."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vision_ft.data import ConversationData
    from vision_ft.export import export_merged
    from vision_ft.tasks import VisionLanguageSFTTask

    L.seed_everything(0)
    data_path = _write_data(tmp_path, n=4)
    task = VisionLanguageSFTTask(VisionLanguageModel(name), method="lora", train_full=["projector"], lr=0.05,
                                 max_new_tokens=4)
    for n, p in task.backbone.model.named_parameters():
        if "lora_B" in n:  # LoRA starts as the identity; give it a visible effect before the step
            torch.nn.init.normal_(p, std=0.05)
    before = {n: p.detach().clone() for n, p in task.backbone.model.named_parameters() if "lora" not in n}
    data = ConversationData(train=str(data_path), batch_size=4, val_fraction=0.0)
    trainer = L.Trainer(max_steps=1, logger=L.pytorch.loggers.CSVLogger(str(tmp_path), name="run"),
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(task, datamodule=data)
    trained = dict(task.backbone.model.named_parameters())
    assert any(not torch.equal(trained[n], before[n]) for n in before if task.backbone.part_of(n) == "projector")
    conv = data.splits["train"][0]
    task.eval()
    inputs, _ = task.prompt_inputs(conv)
    with torch.no_grad():
        want = task.backbone.model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True,
                                            pad_token_id=task.backbone.tokenizer.pad_token_id)
    out = export_merged(task.run_dir, tmp_path / "merged")
    model = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    text = processor.tokenizer.apply_chat_template(conv.messages[:1], tokenize=False, add_generation_prompt=True)
    images = [Image.open(p).convert("RGB") for p in conv.images]
    again = processor(text=[text], images=[images] if images else None, return_tensors="pt")
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        got = model.generate(**again, max_new_tokens=8, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    assert torch.equal(got, want)
    merged = dict(model.named_parameters())
    for n in before:
        if task.backbone.part_of(n) == "projector":
            assert torch.equal(merged[n], trained[n]), n  # the part trained in full is in the export, bit for bit


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_generation_answers_as_one_at_a_time(images, name):
    """Prompts of different lengths (two images, one image, text only) generated together, left-padded,
    give the tokens each gives alone."""
    from vision_ft.tasks import VisionLanguageSFTTask

    task = VisionLanguageSFTTask(VisionLanguageModel(name), method="lora", max_new_tokens=6).eval()
    one = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                {"from": "gpt", "value": "x"}]}
    text = {"conversations": [{"from": "human", "value": "Say something long enough."}, {"from": "gpt", "value": "y"}]}
    convs = [parse_record(r, f"f:{i}", images) for i, r in enumerate([RECORD, one, text])]
    tok = task.backbone.tokenizer
    with torch.no_grad():
        alone = []
        for conv in convs:
            inputs, _ = task.prompt_inputs(conv)
            out = task.backbone.model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=True,
                                               pad_token_id=tok.pad_token_id)
            alone.append(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    assert len({len(task.prompt_inputs(c)[0]["input_ids"][0]) for c in convs}) == 3  # padding really happens
    assert all(alone) and task.answers(convs) == alone


def test_vision_lora_gets_gradients_with_checkpointing_and_a_frozen_tower(images):
    from vision_ft.methods import build_method

    vlm = VisionLanguageModel("qwen2_vl_test_tiny", gradient_checkpointing=True)
    method = build_method({"class_path": "vision_ft.methods.LoRA",
                           "init_args": {"targets": ["qkv"], "towers": ["vision"], "r": 2}})
    method.apply(vlm)
    for n, p in vlm.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    vlm.train()
    sample = encode(vlm.processor, parse_record(RECORD, "f:1", images))
    batch = collate_vl([sample], vlm.tokenizer.pad_token_id)
    from vision_ft.data.chat import shifted_loss

    shifted_loss(vlm(**{k: v for k, v in batch.items() if k != "labels"}), batch["labels"])[0].backward()
    grads = [p.grad for n, p in vlm.model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_methods_command_lists_what_applies_to_a_vision_language_model(capsys):
    from vision_ft.cli import main

    assert main(["methods", "--backbone", "qwen2_5_vl_test_tiny", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    vlm = VisionLanguageModel("qwen2_5_vl_test_tiny")
    linears = [m for n, m in vlm.model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith("model.language_model.layers.")]
    assert rows["lora"]["trainable_params"] == 8 * sum(m.in_features + m.out_features for m in linears)
    assert "stems" in rows["ssf"]["error"]


def test_peft_format_export_and_qlora_keep_the_vision_side_in_full_precision(tmp_path, images):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from vision_ft.data import ConversationData
    from vision_ft.errors import AdapterError
    from vision_ft.export import export_merged, export_peft
    from vision_ft.tasks import VisionLanguageSFTTask

    vlm = VisionLanguageModel("qwen2_vl_test_tiny", quantization="nf4")
    kinds = {n: type(m).__name__ for n, m in vlm.model.named_modules()}
    assert kinds["model.language_model.layers.0.self_attn.q_proj"] == "Linear4bit"
    assert kinds["model.visual.blocks.0.attn.qkv"] == "Linear" and kinds["model.visual.merger.mlp.0"] == "Linear"
    L.seed_everything(0)
    task = VisionLanguageSFTTask(vlm, method="lora", lr=5e-3)
    data = ConversationData(train=str(_write_data(tmp_path)), batch_size=4, val_fraction=0.2)
    trainer = L.Trainer(max_steps=2, logger=L.pytorch.loggers.CSVLogger(str(tmp_path), name="run"),
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        limit_val_batches=1)
    trainer.fit(task, datamodule=data)
    merged = export_merged(task.run_dir, tmp_path / "merged")
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    AutoModelForImageTextToText.from_pretrained(merged, local_files_only=True)  # transformers alone, no bitsandbytes

    # peft format from a full-precision run: PeftModel on the plain base reproduces the trained logits
    L.seed_everything(0)
    plain = VisionLanguageSFTTask(VisionLanguageModel("qwen2_vl_test_tiny"), method="lora", lr=5e-3)
    trainer = L.Trainer(max_steps=2, logger=L.pytorch.loggers.CSVLogger(str(tmp_path), name="run2"),
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        limit_val_batches=1)
    trainer.fit(plain, datamodule=ConversationData(train=str(tmp_path / "train.jsonl"), batch_size=4))
    adapter = export_peft(plain.run_dir, tmp_path / "peft")
    base_dir = VisionLanguageModel("qwen2_vl_test_tiny").save_native(tmp_path / "base")
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_dir, local_files_only=True),
                                      adapter).eval()
    sample = encode(plain.processor, parse_record(RECORD, "f:1", images))
    batch = {k: v for k, v in collate_vl([sample], plain.backbone.tokenizer.pad_token_id).items() if k != "labels"}
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, plain.backbone(**batch), rtol=1e-4, atol=1e-5)
    full = VisionLanguageSFTTask(VisionLanguageModel("qwen2_vl_test_tiny"), method="lora", train_full=["projector"])
    with pytest.raises(AdapterError, match="not part of a peft adapter"):
        full.export_peft(tmp_path / "nope")


def test_fsdp_policy_wraps_the_backbones_own_blocks_of_the_chosen_towers():
    """The sharded fragment's policy needs no class names: one FSDP unit per language-model layer, the vision
    tower left in the root unit (towers: [language]); every block of both towers when towers is unset."""
    from vision_ft.sharding import BackboneBlocks
    from vision_ft.tasks import VisionLanguageSFTTask

    task = VisionLanguageSFTTask(VisionLanguageModel("qwen2_5_vl_test_tiny"), method="lora")
    bb = task.backbone
    language = {bb.blocks[i] for i in bb.tower_blocks("language")}
    everything = set(bb.blocks)
    wrapped = set(BackboneBlocks(["language"])._run_policy(task, set(), {})) - {task}
    assert wrapped == language
    assert set(BackboneBlocks()._run_policy(task, set(), {})) - {task} == everything
    with pytest.raises(ConfigError, match="towers"):
        BackboneBlocks(["text"])._run_policy(task, set(), {})
    import yaml

    fragment = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/trainer/fsdp_vlm.yaml").read_text())
    policy = fragment["trainer"]["strategy"]["init_args"]["auto_wrap_policy"]
    assert policy == {"class_path": "vision_ft.sharding.BackboneBlocks", "init_args": {"towers": ["language"]}}


@pytest.mark.parametrize("name", FAMILIES)
def test_text_only_batches_run_the_vision_side_for_sharded_strategies(images, name):
    """Under ZeRO-3 / FSDP a text-only batch adds 0 x the vision side's output on a blank image: the loss is
    unchanged, the vision tower's and projector's trainable tensors get (zero) gradients, nothing else moves."""
    from vision_ft.methods import build_method
    from vision_ft.data.chat import shifted_loss

    vlm = VisionLanguageModel(name)
    targets = ["qkv"] if vlm.family == "qwen" else ["q", "v"]
    build_method({"class_path": "vision_ft.methods.LoRA",
                  "init_args": {"towers": ["vision"], "targets": targets, "r": 2}}).apply(vlm)
    for n, p in vlm.model.named_parameters():
        if vlm.part_of(n) == "projector" and "image_newline" not in n:
            p.requires_grad_(True)  # trained in full
    calls = []
    hook = vlm.blocks[vlm.tower_blocks("vision")[0]].register_forward_hook(lambda *a: calls.append(1))
    text = {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Yes."}]}
    batch = collate_vl([encode(vlm.processor, parse_record(text, "f:1", images))], vlm.tokenizer.pad_token_id)
    labels = batch.pop("labels")
    loss, _ = shifted_loss(vlm(**batch), labels)
    assert not calls  # a text-only forward never touches the vision tower by itself
    total = loss + 0.0 * vlm.vision_pass()
    hook.remove()
    assert calls and torch.equal(total, loss)
    total.backward()
    vision_side = {n: p for n, p in vlm.model.named_parameters()
                   if p.requires_grad and vlm.part_of(n) != "language_model" and "image_newline" not in n}
    assert vision_side and all(p.grad is not None and not p.grad.any() for p in vision_side.values())


def test_a_llava_folder_with_a_dinov2_tower_and_a_mistral_model_loads_and_trains(tmp_path, images):
    """Nothing assumes a CLIP tower or a Llama/Qwen text model: a LLaVA folder holding DINOv2 + Mistral loads from
    ``checkpoint``, its parts and towers are found, and LoRA in both towers receives gradients."""
    from transformers import AutoModelForImageTextToText, CLIPImageProcessor, LlavaConfig, LlavaProcessor

    from vision_ft.backbones.vlm_presets import tiny_vl_tokenizer
    from vision_ft.data.chat import shifted_loss
    from vision_ft.methods import build_method

    tok = tiny_vl_tokenizer("llava")
    vision = dict(model_type="dinov2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=56, patch_size=14)
    text = dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      image_seq_length=16, vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(cfg).save_pretrained(tmp_path / "folder")
    ip = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                   image_token="<image>", num_additional_image_tokens=1,
                   chat_template=tok.chat_template).save_pretrained(tmp_path / "folder")
    vlm = VisionLanguageModel(checkpoint=str(tmp_path / "folder"))
    assert "Dinov2" in type(vlm.blocks[vlm.tower_blocks("vision")[0]]).__name__
    assert "Mistral" in type(vlm.blocks[vlm.tower_blocks("language")[0]]).__name__
    assert vlm.part_of("model.vision_tower.embeddings.patch_embeddings.projection.weight") == "vision_tower"
    build_method({"class_path": "vision_ft.methods.LoRA",
                  "init_args": {"towers": ["vision", "language"], "targets": ["q", "v"], "r": 2}}).apply(vlm)
    for n, p in vlm.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    batch = collate_vl([encode(vlm.processor, parse_record(RECORD, "f:1", images))], vlm.tokenizer.pad_token_id)
    labels = batch.pop("labels")
    shifted_loss(vlm(**batch), labels)[0].backward()
    grads = {n: p.grad for n, p in vlm.model.named_parameters() if "lora_A" in n}
    assert any(n.startswith("model.vision_tower.") for n in grads) and any("language_model" in n for n in grads)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
