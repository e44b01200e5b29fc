"""``bench diffusion --quick``: LoRA, SaRA and full fine-tuning of the tiny UNet side by side."""

import json


def test_bench_diffusion_quick_rows_and_sparse_state(tmp_path, capsys):
    from vision_ft.bench import cmd_bench

    assert cmd_bench(["diffusion", "--quick", "--part", "image", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_diffusion.json").read_text())
    rows = result["rows"]
    assert set(rows) == {"lora", "sara", "full"}
    assert rows["full"]["trainable"] == result["model"]["parameters"]
    assert 0 < rows["lora"]["trainable"] < rows["sara"]["trainable"] < rows["full"]["trainable"]
    sara = rows["sara"]
    # AdamW keeps two fp32 moments per trained value and nothing for the frozen entries
    assert sara["optimizer_moment_bytes"] == 8 * sara["trainable"]
    assert sara["method_buffer_bytes"] >= 8 * sara["trainable"]  # int64 mask indices, reported apart
    assert result["goals"]["sara_optimizer_bytes_vs_12x"]["met"]
    assert "lora_step_vs_full" in result["goals"]
    assert "goal lora_step_vs_full" in capsys.readouterr().out
