"""WiSE-FT (`export --interpolate`): exact endpoints, linear path, integer tensors, refusals."""

import pytest
import torch
from safetensors.torch import load_file

from clip_helpers import NAMES, X, perturb_trainable
from conftest import make_task
import vision_ft.methods.clip_lora  # noqa: F401 - registers clip_lora
from vision_ft.backbones.open_clip import OpenCLIP
from vision_ft.cli import main
from vision_ft.errors import AdapterError, ConfigError
from vision_ft.export import export_merged, save_adapter
from vision_ft.tasks.clip_classification import CLIPClassificationTask
from vision_ft.wise_ft import interpolate_state


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(5, 3, generator=g), "half": torch.randn(4, generator=g).half(),
            "ids": torch.arange(6), "count": torch.tensor(7)}


def test_endpoints_are_exact_and_the_middle_is_linear():
    zero, tuned = _state(0), _state(1)
    tuned["ids"], tuned["count"] = zero["ids"].clone(), zero["count"].clone()
    at0, at1 = interpolate_state(zero, tuned, 0.0), interpolate_state(zero, tuned, 1.0)
    assert all(torch.equal(at0[k], zero[k]) and at0[k].dtype == zero[k].dtype for k in zero)
    assert all(torch.equal(at1[k], tuned[k]) for k in tuned)
    mid = interpolate_state(zero, tuned, 0.25)
    assert torch.allclose(mid["w"], 0.75 * zero["w"] + 0.25 * tuned["w"], atol=1e-7)
    assert mid["half"].dtype == torch.float16
    assert torch.allclose(mid["half"].float(), 0.75 * zero["half"].float() + 0.25 * tuned["half"].float(), atol=1e-3)
    assert torch.equal(mid["ids"], tuned["ids"]) and mid["ids"].dtype == torch.int64  # not interpolated


def test_bad_alpha_and_mismatched_models_are_refused():
    zero, tuned = _state(0), _state(0)
    with pytest.raises(ConfigError, match="alpha must lie in"):
        interpolate_state(zero, tuned, 1.5)
    with pytest.raises(AdapterError, match="different tensors"):
        interpolate_state({k: v for k, v in zero.items() if k != "w"}, tuned, 0.5)
    tuned["count"] = torch.tensor(8)
    with pytest.raises(AdapterError, match="integer tensor differs"):
        interpolate_state(zero, tuned, 0.5)


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("wise")
    task = CLIPClassificationTask(OpenCLIP("open_clip_test_tiny"), method="clip_lora", num_classes=4,
                                  class_names=NAMES).eval()
    perturb_trainable(task.backbone.model)
    task._cache.clear()
    with torch.no_grad():
        tuned_logits = task(X)
        with task.zero_shot_model():
            task._cache.clear()
            zero_logits = task(X)
    save_adapter(task, root / "run")
    return root, tuned_logits, zero_logits


def _native_logits(out):
    import open_clip

    model = open_clip.create_model(f"local-dir:{out}").eval()
    head = load_file(out / "class_text_features.safetensors")
    with torch.no_grad():
        x = OpenCLIP("open_clip_test_tiny").preprocess(X)
        return head["logit_scale"] * model.encode_image(x, normalize=True) @ head["text_features"].T, model


def test_sweep_through_the_cli_gives_the_zero_shot_and_fine_tuned_models_at_the_ends(clip_run, capsys):
    root, tuned_logits, zero_logits = clip_run
    assert main(["export", str(root / "run"), "--interpolate", "0", "0.5", "1", "--out", str(root / "wise")]) == 0
    assert "WiSE-FT alpha=0.5" in capsys.readouterr().out
    base = OpenCLIP("open_clip_test_tiny").model.state_dict()
    merged_dir = export_merged(root / "run", root / "merged")
    merged = load_file(merged_dir / "open_clip_model.safetensors")
    at = {a: load_file(root / "wise" / f"alpha_{a}" / "open_clip_model.safetensors") for a in ("0.00", "0.50", "1.00")}
    assert set(at["0.00"]) == set(base) == set(merged)
    assert all(torch.equal(at["0.00"][k], base[k]) for k in base)  # alpha 0: the zero-shot weights, bit for bit
    assert all(torch.equal(at["1.00"][k], merged[k]) for k in merged)  # alpha 1: the merged fine-tuned weights
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed, "the adapter changed nothing: the test would prove nothing"
    for k in changed:
        assert torch.allclose(at["0.50"][k], (base[k] + merged[k]) / 2, atol=1e-6)
    logits0, _ = _native_logits(root / "wise" / "alpha_0.00")
    logits1, _ = _native_logits(root / "wise" / "alpha_1.00")
    assert torch.allclose(logits0, zero_logits, atol=1e-4)
    assert torch.allclose(logits1, tuned_logits, atol=1e-4)
    logits_mid, _ = _native_logits(root / "wise" / "alpha_0.50")
    assert not torch.allclose(logits_mid, logits0, atol=1e-3) and not torch.allclose(logits_mid, logits1, atol=1e-3)


def test_tasks_and_methods_without_a_zero_shot_counterpart_are_refused(tmp_path):

    from vision_ft.wise_ft import export_interpolated

    coop = CLIPClassificationTask(OpenCLIP("open_clip_test_tiny"), method="coop", num_classes=4, class_names=NAMES)
    save_adapter(coop, tmp_path / "coop")
    with pytest.raises(AdapterError, match="not weights of the model"):
        export_interpolated(tmp_path / "coop", tmp_path / "out", [0.5])
    timm_task = make_task("lora")
    save_adapter(timm_task, tmp_path / "timm")
    with pytest.raises(AdapterError, match="no zero-shot counterpart"):
        export_interpolated(tmp_path / "timm", tmp_path / "out2", [0.5])
    assert main(["export", str(tmp_path / "timm"), "--interpolate", "0.5", "--out", str(tmp_path / "o3")]) != 0
