"""``python -m vision_ft bench vlm`` on the tiny Qwen2.5-VL: kit rows and their plain-loop twins are the same
model and setup, the goals are computed from the measured rows, the JSON is written."""

from __future__ import annotations

import json

import pytest
import torch

from vision_ft.bench.vlm import build_kit, build_plain, cmd_vlm, conversations, goals, make_batch
from vision_ft.errors import ConfigError

TINY = "qwen2_5_vl_test_tiny"


@pytest.mark.parametrize("method", ["lora", "full"])
def test_kit_row_and_plain_twin_compute_the_same_loss_on_the_same_trainables(tmp_path, method):
    kit, plain = build_kit(method, TINY, 4), build_plain(method, TINY, 4)
    batch = make_batch(kit.processor, conversations(tmp_path, 2, 12, kit.processor.tokenizer))
    assert int((batch["labels"] != -100).sum()) > 0
    with torch.no_grad():
        ours = kit.training_loss(batch)
        theirs = plain(**batch).loss
    assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(kit) == count(plain) > 0


def test_quick_run_reports_every_setup_and_goals_from_its_rows(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    assert cmd_vlm(["--quick", "--json", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((tmp_path / "bench_vlm.json").read_text())
    rows = result["rows"]
    assert set(rows) == {"lora", "lora_plain", "qlora", "qlora_plain", "full", "full_plain"}
    assert all(r["step_s"] > 0 and r["trainable"] > 0 for r in rows.values())
    assert rows["lora"]["trainable"] == rows["lora_plain"]["trainable"] < rows["full"]["trainable"]
    assert rows["full"]["trainable"] == rows["full_plain"]["trainable"]
    g = result["goals"]
    assert g["lora_step_vs_full"]["value"] == pytest.approx(rows["lora"]["step_s"] / rows["full"]["step_s"])
    assert g["qlora_kit_vs_plain"]["value"] == pytest.approx(rows["qlora"]["step_s"] / rows["qlora_plain"]["step_s"])
    q = rows["qlora"]
    assert 0 < q["quantised_bytes"] < 0.3 * q["fp32_bytes"] and g["qlora_weight_bytes_vs_fp32"]["met"]
    assert goals({"lora": {"step_s": 2.0}, "full": {"step_s": 4.0}})["lora_step_vs_full"] == \
        {"value": 0.5, "goal": 0.75, "met": True}


def test_bad_options_are_clear_errors():
    with pytest.raises(ConfigError, match="Qwen-VL preset"):
        cmd_vlm(["--quick", "--backbone", "llava_test_tiny"])
    with pytest.raises(ConfigError, match="batch-size"):
        cmd_vlm(["--quick", "--batch-size", "0"])


def test_video_run_compares_q_adapter_with_lora_on_the_same_video_batch(tmp_path, capsys):
    pytest.importorskip("av")
    assert cmd_vlm(["--quick", "--video", "--json", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((tmp_path / "bench_vlm_video.json").read_text())
    rows, model = result["rows"], result["model"]
    assert set(rows) == {"lora", "lora_plain", "q_adapter", "q_adapter_lora"}
    assert model["input"] == "video" and model["image_tokens_per_step"] > 0
    assert rows["q_adapter_lora"]["trainable"] == rows["q_adapter"]["trainable"] + rows["lora"]["trainable"]
    assert rows["q_adapter"]["trainable"] == 2 * (16 * 32 + 4 * 32 * 16 + 1)  # 2 blocks, width 32, d = 16
    for name in ("q_adapter", "q_adapter_lora"):  # not mergeable: inference measured against the base model
        r = rows[name]
        assert r["infer_s"] > 0 and r["infer_vs_base"] == pytest.approx(r["infer_s"] / model["base_infer_s"])
    assert "infer_s" not in rows["lora"]  # LoRA merges: no inference cost to measure
