"""``bench diffusion --part video --quick``: TIC-FT + LoRA against plain LoRA on the same frames of the tiny Wan
transformer, and the buffer-count sweep (0, 1, 3)."""

import json

import pytest


def test_video_rows_layouts_and_goal(tmp_path, capsys):
    from vision_ft.bench import cmd_bench

    assert cmd_bench(["diffusion", "--quick", "--part", "video", "--threads", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_diffusion.json").read_text())
    assert "rows" not in result  # the image rows were not asked for
    video = result["video"]
    rows = video["rows"]
    assert list(rows) == ["lora", "tic_ft_b0", "tic_ft_b1", "tic_ft_b3"]
    assert [rows[r]["layout"] for r in rows] == [[0, 0, 13], [4, 0, 9], [3, 1, 9], [1, 3, 9]]
    assert len({r["trainable"] for r in rows.values()}) == 1  # the same LoRA in every row
    assert all(r["step_s"] > 0 for r in rows.values())
    goal = video["goals"]["tic_ft_step_vs_lora"]
    assert goal["value"] == pytest.approx(rows["tic_ft_b3"]["step_s"] / rows["lora"]["step_s"])
    assert result["meta"]["threads"] == 1
    out = capsys.readouterr().out
    assert "bench diffusion (video)" in out and "goal tic_ft_step_vs_lora" in out
