"""`python -m vision_ft bench` on a tiny ViT: every registered method, real counts, ratios, goals, the page."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from vision_ft.bench import cmd_bench, write_report
from vision_ft.bench.common import RandomData, Settings, parse_methods
from vision_ft.errors import ConfigError
from vision_ft.methods import registered

# the bench measures image classification on a timm ViT: methods that need a CLIP text tower are skipped
METHODS = sorted(n for n, cls in registered().items()
                 if not getattr(cls, "requires_text_tower", False) and not cls.needs_in_context_task)
SKIPPED = sorted(set(registered()) - set(METHODS))
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick `bench all` (params + train + infer) for the module; its JSON output and folder."""
    out = tmp_path_factory.mktemp("bench")
    import contextlib
    import io

    buf = io.StringIO()
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(buf):
        assert cmd_bench(["all", "--quick", "--threads", "1", "--out", str(out), "--json"]) == 0
    assert torch.get_num_threads() == threads  # --threads applies to the command only
    return json.loads(buf.getvalue()), out


def _rows(result, section):
    return {r["method"]: r for r in result[section]["result"]["rows"]}


def test_every_registered_method_has_a_row_in_every_section(quick):
    result, out = quick
    for section in ("params", "train", "infer"):
        assert sorted(_rows(result, section)) == METHODS, section
        skipped = result[section]["result"]["skipped"]
        assert sorted(s["method"] for s in skipped) == SKIPPED, section  # counted, with the reason
        assert all(s["reason"] for s in skipped)
        saved = json.loads((out / f"bench_{section}.json").read_text())
        assert saved["meta"]["command"].startswith("python -m vision_ft bench all --quick")
        assert saved["meta"]["machine"]["torch_threads"] == 1
    assert result["params"]["meta"]["settings"]["backbone"] == "vit_test_tiny"


def test_parameter_counts_are_the_methods_own(quick):
    from vision_ft.backbones import TimmViT
    from vision_ft.tasks import ImageClassificationTask

    result, _ = quick
    rows = _rows(result, "params")
    base = sum(p.numel() for p in TimmViT("vit_test_tiny").model.parameters())
    assert result["params"]["result"]["base_params"] == base
    for name in METHODS:
        task = ImageClassificationTask(TimmViT("vit_test_tiny"), method=name, num_classes=3)
        if task.method.requires_data:  # the bench prepares on its random data: do the same here
            task.method.prepare(task, RandomData(3, n=8, size=32, batch_size=2, seed=1))
        count = task.method.trainable_parameters(task.backbone)
        row = rows[name]
        assert row["trainable_params"] == count, name
        assert row["trainable_with_head"] == count + 32 * 3 + 3, name
        assert row["paper_match"] is None  # only compared on vit_base_patch16_224
    assert rows["full"]["trainable_params"] == base and rows["linear"]["trainable_params"] == 0
    assert rows["mosa"]["deployed_params"] < rows["mosa"]["trainable_params"]  # experts folded at train end


def test_train_ratios_and_exact_state_bytes(quick):
    result, _ = quick
    train = result["train"]["result"]
    ref = train["reference"]
    n_full = 32_224 + 32 * 3 + 3
    tensors_full = sum(1 for _ in _full_parameter_tensors())
    assert ref["memory"]["grad_bytes"] == 4 * n_full
    assert ref["memory"]["optimizer_bytes"] == 8 * n_full + 4 * tensors_full  # two moments + a step scalar each
    rows = _rows(result, "train")
    assert len(ref["time"]["samples_s"]) == 2 * len(rows)  # full's steps alternate with every method's
    for name, row in rows.items():
        # each ratio divides medians taken in the same rounds
        assert row["ratio_vs_full"] == pytest.approx(row["time"]["median_s"] / row["full_time"]["median_s"])
        assert len(row["time"]["samples_s"]) == len(row["full_time"]["samples_s"]) == 2
        if "peft_twin" in row:
            assert row["ratio_vs_peft"] == pytest.approx(row["time"]["median_s"]
                                                         / row["peft_twin"]["time"]["median_s"])
        assert row["memory"]["activation_bytes"] > 0 or name == "linear"
    lin = rows["linear"]["memory"]
    assert lin["grad_bytes"] == 4 * (32 * 3 + 3)  # only the head has gradients
    assert lin["ideal_saving_bytes"] == 12 * 32_224 and lin["saving_fraction"] == pytest.approx(1.0, abs=0.02)
    assert rows["dr_tune"]["memory"]["ideal_saving_bytes"] == 0  # trains every base weight
    assert rows["dr_tune"]["memory"]["realised_saving_bytes"] < 0  # and holds a frozen copy on top
    family = {n for n, r in rows.items() if r["lora_family"]}
    assert {"lora", "pego", "snell", "spt_lora"} <= family and "ssf" not in family
    for name in family:
        assert rows[name]["ratio_vs_peft"] > 0 and rows[name]["peft_twin"]["r"] >= 1
    assert rows["lora"]["peft_twin"]["trainable_params"] == rows["lora"]["trainable_params"]
    assert "ratio_vs_peft" not in rows["ssf"]


def _full_parameter_tensors():
    from vision_ft.backbones import TimmViT

    yield from TimmViT("vit_test_tiny").model.parameters()
    yield from torch.nn.Linear(32, 3).parameters()


def test_merged_inference_is_the_plain_model_and_has_a_ratio(quick):
    result, _ = quick
    for name, row in _rows(result, "infer").items():
        assert row["unmerged_ratio"] > 0
        if registered()[name].mergeable:
            assert row["merged_ratio"] > 0 and row["merged_plain_model"] is True, name
        else:
            assert row["merged_ratio"] is None and "not mergeable" in row["why_unmerged"]


def test_goals_cover_every_method_and_misses_carry_a_reason(quick):
    result, _ = quick
    goals = result["goals"]
    for name in METHODS:
        kinds = {g["goal"] for g in goals if g["method"] == name}
        if name != "full":
            assert {"time", "memory"} <= kinds, name
        if registered()[name].mergeable:
            assert "merge" in kinds
    family = {r["method"] for r in result["train"]["result"]["rows"] if r["lora_family"]}
    assert {g["method"] for g in goals if g["goal"] == "peft"} == family
    dr = next(g for g in goals if g["method"] == "dr_tune" and g["goal"] == "memory")
    assert dr["met"] is False and "frozen copy" in dr["why"]
    for g in goals:
        assert (g["why"] is not None) == (g["met"] is False)


def test_report_page_has_tables_plots_command_and_machine(quick, tmp_path):
    _, out = quick
    page = write_report(out, tmp_path / "benchmarks.md")
    text = page.read_text()
    cpu = json.loads((out / "bench_train.json").read_text())["meta"]["machine"]["cpu"]
    assert "`python -m vision_ft bench all --quick" in text and cpu in text and "**Reduced run**" in text
    for name in METHODS:
        assert f"| {name} |" in text
    for heading in ("## Trainable parameters", "## Training step", "## Inference latency", "## Goals"):
        assert heading in text
    png = tmp_path / "benchmarks" / "ratios.png"
    assert f"({png.parent.name}/ratios.png)" in text and png.read_bytes()[:8] == PNG


def test_method_specs_variants_and_errors():
    specs = parse_methods(["lora,ssf", "mosa:consistency=true:bottleneck=16"], {"lora": {"r": 4}})
    assert [s.label for s in specs] == ["lora[r=4]", "ssf", "mosa[bottleneck=16,consistency=true]"]
    mosa = specs[2].build()
    assert mosa.consistency is True and mosa.bottleneck == 16
    assert [s.name for s in parse_methods(None)] == sorted(registered())  # the registry, in order
    with pytest.raises(ConfigError, match="Did you mean 'lora'"):
        parse_methods(["lroa"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_methods(["lora:r"])
    with pytest.raises(ConfigError, match="--method-args"):
        cmd_bench(["params", "--quick", "--method-args", "{not json"])
    with pytest.raises(ConfigError, match="no CUDA"):
        if not torch.cuda.is_available():
            cmd_bench(["params", "--quick", "--device", "cuda"])
        else:  # pragma: no cover - GPU machines
            raise ConfigError("no CUDA (skipped: a GPU is present)")


_HOLDING_CHILD = """
import json, sys, time, torch
from vision_ft.bench import common
from vision_ft.bench.common import Settings
from vision_ft.bench.memory import measure

size = 64 * 2**20
step = common.train_step

def step_holding_a_known_tensor(task, batch, opt):
    held = torch.ones(size // 4)  # written, so its pages are resident
    time.sleep(0.02)  # long enough for the RSS sampler too, where the kernel mark is not trusted
    out = step(task, batch, opt)
    del held
    return out

common.train_step = step_holding_a_known_tensor
settings = Settings(backbone="vit_test_tiny", batch_size=2, num_classes=3, rss_steps=1)
print(json.dumps(measure({"settings": settings.to_dict(), "threads": 1, "spec": {"name": "lora", "args": []}})))
"""


@pytest.mark.subprocess
@pytest.mark.timeout(180)
def test_peak_memory_child_sees_a_known_allocation_inside_the_step():
    """The fresh-process measurement's own code, in a fresh process as the bench runs it, with a known 64 MiB
    tensor alive during the training step: the measured peak must contain it and not much more. (Inside the
    long-lived test process, memory freed by earlier tests stays resident and is reused, so no RSS-based
    measurement could see the tensor there: that is why the bench measures in fresh processes.)"""
    import os
    import subprocess
    import sys

    size = 64 * 2**20
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", _HOLDING_CHILD], capture_output=True, text=True, env=env,
                          timeout=170, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert size * 0.98 <= result["peak_bytes"] < size + 256 * 2**20, result
    assert result["baseline_bytes"] > 0 and "RSS" in result["how"]


@pytest.mark.slow
def test_peak_memory_in_fresh_processes_full_above_linear(tmp_path):
    """Full fine-tuning allocates gradients and AdamW moments for every weight: its peak is higher."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cmd_bench(["train", "--backbone", "vit_test_small", "--batch-size", "4", "--num-classes", "3",
                   "--warmup", "1", "--repeats", "1", "--methods", "linear", "--rss", "--threads", "1",
                   "--out", str(tmp_path), "--json"])
    train = json.loads(buf.getvalue())["train"]["result"]
    full_peak = train["reference"]["peak"]["peak_bytes"]
    linear_peak = train["rows"][0]["peak"]["peak_bytes"]
    assert full_peak > linear_peak > 0


def test_transfer_testbed_reports_accuracy_params_and_retention(tmp_path):
    import contextlib
    import io

    args = ["transfer", "--quick", "--threads", "1", "--out", str(tmp_path), "--methods", "linear", "full", "lora",
            "--seeds", "0", "1", "--json"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cmd_bench(args) == 0
    result = json.loads(buf.getvalue())["transfer"]["result"]
    assert result["checkpoint_reused"] is False and Path(result["checkpoint"]).is_file()
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["linear", "full", "lora"]
    # the backbone of a linear probe does not change: retention is the source accuracy, exactly
    assert [r["retention"] for r in rows["linear"]["runs"]] == [result["source_acc"]] * 2
    assert rows["linear"]["trainable_params"] == 0
    from safetensors.torch import load_file

    source_params = sum(t.numel() for t in load_file(result["checkpoint"]).values())
    assert rows["full"]["trainable_params"] == source_params > rows["lora"]["trainable_params"] > 0
    import statistics

    accs = [r["target_acc"] for r in rows["lora"]["runs"]]
    assert rows["lora"]["target_acc_mean"] == pytest.approx(statistics.fmean(accs))
    assert rows["lora"]["target_acc_std"] == pytest.approx(statistics.stdev(accs))
    # second run: the cached source model is reused and gives the same source accuracy
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cmd_bench(["transfer", "--quick", "--threads", "1", "--out", str(tmp_path), "--methods", "linear",
                   "--seeds", "0", "--json", "--report", str(tmp_path / "page.md")])
    again = json.loads(buf.getvalue())["transfer"]["result"]
    assert again["checkpoint_reused"] is True and again["source_acc"] == result["source_acc"]
    assert (tmp_path / "page" / "transfer.png").read_bytes()[:8] == PNG
    assert "## Transfer testbed" in (tmp_path / "page.md").read_text()


def test_append_adds_rows_to_a_section_measured_with_the_same_settings(tmp_path):
    out = str(tmp_path / "b")
    with contextlib.redirect_stdout(io.StringIO()):
        assert cmd_bench(["params", "--quick", "--methods", "lora", "ssf", "--out", out]) == 0
        assert cmd_bench(["params", "--quick", "--methods", "ssf:init_std=0.5", "linear", "--append",
                          "--out", out]) == 0
    saved = json.loads((tmp_path / "b" / "bench_params.json").read_text())
    labels = [r["method"] for r in saved["result"]["rows"]]
    assert sorted(labels) == sorted(["lora", "ssf", "linear", "ssf[init_std=0.5]"]) and labels == sorted(labels)
    assert saved["meta"]["command"].endswith("--methods lora ssf --out " + out)
    assert saved["meta"]["appended"][0]["methods"] == ["linear", "ssf[init_std=0.5]"]
    text = write_report(tmp_path / "b", tmp_path / "page.md").read_text()
    assert "added by `python -m vision_ft bench params --quick --methods ssf:init_std=0.5 linear --append" in text
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(ConfigError, match="other settings.*batch_size"):
        cmd_bench(["params", "--quick", "--batch-size", "3", "--methods", "lora", "--append", "--out", out])


def test_a_new_method_brings_its_bench_metadata_without_edits_in_bench():
    """Paper count, peft twin and goal notes come from the method class alone (adding a method edits no
    file under vision_ft/bench)."""
    from vision_ft.backbones import TimmViT
    from vision_ft.bench.common import MethodSpec
    from vision_ft.bench.family import in_lora_family, peft_equivalent
    from vision_ft.bench.params import paper_value
    from vision_ft.bench.report import evaluate_goals
    from vision_ft.methods import LoRA, register, unregister

    @register
    class TwinnedLoRA(LoRA):
        name = "lora_bench_meta_test"
        prefix = "lbmt_"
        bench_notes = {"time": "pinned by the test"}

        def paper_parameters(self):
            return {"value": 1, "precision": 1, "text": "1", "compare": "trainable", "source": "test"}

    try:
        backbone = TimmViT("vit_test_tiny")
        method = TwinnedLoRA(r=4, dropout=0.1)
        assert paper_value(MethodSpec("lora_bench_meta_test"), method)["source"] == "test"
        assert in_lora_family(method)
        twin = peft_equivalent(method, backbone)
        assert (twin["r"], twin["dropout"], twin["modules"]) == (4, 0.1, ["blocks.0.attn.qkv", "blocks.1.attn.qkv"])
        row = {"method": "x", "name": "lora_bench_meta_test", "ratio_vs_full": 2.0,
               "memory": {"ideal_saving_bytes": 1, "realised_saving_bytes": 1, "saving_fraction": 1.0}}
        goals = evaluate_goals({"rows": [row]}, None)
        assert next(g for g in goals if g["goal"] == "time")["why"] == "pinned by the test"
    finally:
        unregister("lora_bench_meta_test")


@pytest.mark.subprocess
@pytest.mark.timeout(180)
@pytest.mark.parametrize("broken", ["frozen", "current_rss"])
def test_peak_memory_falls_back_to_sampling_when_the_kernel_mark_does_not_track(broken):
    """A /proc that accepts clear_refs but keeps VmHWM still (or reports the current RSS as the
    peak) must not give a peak of zero: the probe catches it and the RSS sampler measures instead."""
    import os
    import subprocess
    import sys

    patch = f"""
from vision_ft.bench import memory
real = memory._status_kib
frozen = real("VmHWM")
def fake(key):
    if key == "VmHWM":
        return frozen if {broken!r} == "frozen" else real("VmRSS")
    return real(key)
memory._status_kib = fake
assert memory._reset_peak() is False
"""
    size = 64 * 2**20
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", patch + _HOLDING_CHILD], capture_output=True, text=True, env=env,
                          timeout=170, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "sampled" in result["how"], result
    assert size * 0.98 <= result["peak_bytes"] < size + 256 * 2**20, result
