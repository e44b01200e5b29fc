"""Q-Adapter: exactly the base model at step 0 (bitwise, video and image conversations, alone and with LoRA),
only its tensors train, counts by its formula, per-token updates (packed sequences never mix), it learns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vision_ft.backbones import VisionLanguageModel
from vision_ft.data.conversations import collate_vl, encode, parse_record
from vision_ft.data.vl_video import VideoSampling
from vision_ft.errors import ConfigError
from vision_ft.methods import build_method
from vision_ft.methods.q_adapter import QueryCrossAttention

VIDEO_FAMILIES = ["qwen2_vl_test_tiny", "qwen2_5_vl_test_tiny", "qwen3_vl_test_tiny", "llava_onevision_test_tiny"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    pytest.importorskip("av")
    from vision_ft.data.video import write_video

    root = tmp_path_factory.mktemp("qa")
    rng = np.random.default_rng(0)
    write_video(root / "clip.mp4", (rng.random((12, 48, 64, 3)) * 255).astype("uint8"), fps=6, codec="ffv1")
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(root / "a.png")
    return root


def _batch(vlm, media, kind):
    record = {"video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\nDescribe."},
                                                     {"from": "gpt", "value": "A grasper."}]} if kind == "video" else \
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                              {"from": "gpt", "value": "A polyp."}]}
    conv = parse_record(record, "f:1", media)
    conv.sampling = VideoSampling(fps=2.0, min_frames=2, max_frames=4)
    batch = collate_vl([encode(vlm.processor, conv)], vlm.tokenizer.pad_token_id)
    return batch, batch.pop("labels")


def _spec(**kw):
    return {"class_path": "vision_ft.methods.QAdapter", "init_args": kw}


@pytest.mark.parametrize("name", VIDEO_FAMILIES)
@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8}])
def test_step_zero_is_the_base_model_bitwise_on_video(media, name, lora):
    vlm = VisionLanguageModel(name)
    batch, _ = _batch(vlm, media, "video")
    with torch.no_grad():
        base = vlm(**batch)
    method = build_method(_spec(lora=lora, gate="channel" if lora else "scalar"))
    method.apply(vlm)
    assert any(n.startswith("model.") and "q_adapter_" in n for n, _ in vlm.model.named_parameters())
    with torch.no_grad():
        assert torch.equal(vlm(**batch), base)
    with torch.no_grad():  # a non-zero gate changes the output: the adapter is on the path
        for n, p in vlm.model.named_parameters():
            if n.endswith("q_adapter_mlp.gate"):
                p.fill_(0.5)
        assert not torch.equal(vlm(**batch), base)


def test_only_its_tensors_and_stacked_lora_train_and_the_gate_learns_first(media):
    from vision_ft.data.chat import shifted_loss

    vlm = VisionLanguageModel("qwen2_5_vl_test_tiny")
    method = build_method(_spec(lora={"r": 4, "alpha": 8}))
    method.apply(vlm)
    trainable = {n for n, p in vlm.model.named_parameters() if p.requires_grad}
    assert trainable and all(("q_adapter_" in n) or ("lora_" in n) for n in trainable)
    assert any("q_adapter_" in n and n.startswith("model.visual.") for n in trainable)
    assert any("lora_" in n and n.startswith("model.language_model.") for n in trainable)
    batch, labels = _batch(vlm, media, "image")  # the image path works the same way
    shifted_loss(vlm(**batch), labels)[0].backward()
    grads = {n: p.grad for n, p in vlm.model.named_parameters() if "q_adapter_" in n}
    # at g = 0 only the gate moves the loss (d tanh(g) f / d theta = tanh(g) f' = 0 for the other tensors)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith(".gate"))
    assert all(not g.any() for n, g in grads.items() if not n.endswith(".gate"))
    with torch.no_grad():
        for n, p in vlm.model.named_parameters():
            if n.endswith(".gate"):
                p.fill_(0.1)
    vlm.model.zero_grad()
    shifted_loss(vlm(**batch), labels)[0].backward()
    assert all(p.grad.abs().sum() > 0 for n, p in vlm.model.named_parameters() if n.endswith("q_adapter_mlp.queries"))


def test_trainable_count_follows_the_formula_and_the_keys():
    vlm = VisionLanguageModel("qwen2_5_vl_test_tiny")  # vision width 32, 2 blocks
    method = build_method(_spec(num_queries=4, attn_dim=16, heads=2, blocks=[1], gate="channel", position="attn"))
    method.apply(vlm)
    d, q, a = 32, 4, 16
    assert method.trainable_parameters(vlm) == q * d + 4 * d * a + d
    names = [n for n, p in vlm.model.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("model.visual.blocks.1.q_adapter_attn.") for n in names)
    with pytest.raises(ConfigError, match="blocks"):
        build_method(_spec(blocks=[7])).apply(VisionLanguageModel("qwen2_5_vl_test_tiny"))
    with pytest.raises(ConfigError, match="position"):
        build_method(_spec(position="ffn"))
    with pytest.raises(ConfigError, match="lora"):
        build_method(_spec(lora={"rank": 4}))


def test_each_token_is_updated_from_itself_alone():
    """Packed sequences (Qwen-VL puts every image and frame of a batch in one sequence) cannot mix samples."""
    torch.manual_seed(0)
    m = QueryCrossAttention(dim=24, num_queries=5, attn_dim=12, heads=3, gate="scalar")
    with torch.no_grad():
        m.gate.fill_(0.7)
    h = torch.randn(10, 24)
    together = m(h)
    alone = torch.cat([m(h[i:i + 1]) for i in range(10)])
    assert torch.allclose(together, alone, atol=1e-6)
    assert torch.allclose(m(h.view(2, 5, 24)).view(10, 24), together, atol=1e-6)
    # and by hand: tanh(g) W_o softmax((h W_q)(q W_k)^T / sqrt(d)) (q W_v), heads split on the width
    q, k, v = m.w_q(h).view(10, 3, 4), m.w_k(m.queries).view(5, 3, 4), m.w_v(m.queries).view(5, 3, 4)
    att = torch.softmax(torch.einsum("thd,qhd->htq", q, k) / 2.0, dim=-1)
    ref = torch.tanh(torch.tensor(0.7)) * m.w_o(torch.einsum("htq,qhd->thd", att, v).reshape(10, 12))
    assert torch.allclose(together, ref, atol=1e-5)


def test_methods_command_reports_q_adapter_as_a_share_of_the_base(capsys):
    from vision_ft.cli import main

    assert main(["methods", "--backbone", "qwen2_5_vl_test_tiny", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    row = rows["q_adapter"]
    assert row["trainable_params"] == 2 * (16 * 32 + 4 * 32 * 16 + 1) and row["mergeable"] is False  # d = D / 2


def test_q_adapter_with_lora_trains_through_the_task_and_its_adapter_reloads(media, tmp_path):
    import lightning as L

    from vision_ft.data import ConversationData
    from vision_ft.tasks import VisionLanguageSFTTask

    record = {"video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\nDescribe."},
                                                     {"from": "gpt", "value": "A grasper."}]}
    path = tmp_path / "train.jsonl"
    path.write_text((json.dumps(record) + "\n") * 4)
    L.seed_everything(0)
    task = VisionLanguageSFTTask(VisionLanguageModel("qwen2_5_vl_test_tiny"), method=_spec(lora={"r": 4, "alpha": 8}),
                                 lr=1e-2, max_new_tokens=3)
    data = ConversationData(train=str(path), image_root=str(media), batch_size=2, val_fraction=0.0,
                            video_min_frames=2, video_max_frames=4)
    trainer = L.Trainer(max_steps=3, logger=L.pytorch.loggers.CSVLogger(str(tmp_path), name="run"),
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(task, datamodule=data)
    gates = [p for n, p in task.backbone.model.named_parameters() if n.endswith("q_adapter_mlp.gate")]
    assert gates and all(g.abs().item() > 0 for g in gates)  # training opened the gates
    import vision_ft

    loaded = vision_ft.load_adapter(task.run_dir)
    mine = task.method.adapter_state_dict(task.backbone)
    theirs = loaded.method.adapter_state_dict(loaded.backbone)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
