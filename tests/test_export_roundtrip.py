"""`export --merge` for every (task, backbone family) pair a shipped config or doc names: the export
loads in its native library alone and gives the task's logits (1e-5); pairs that cannot export are
refused before training."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vision_ft.cli import main
from vision_ft.export import load_adapter, save_adapter

X = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
NAMES = ["normal", "lesion", "fibrosis"]


def _perturb_trainable(task, seed=1):
    """Move every trainable tensor away from its (often identity) initialisation, so the merge matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in task.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _classification(backbone, method):
    from vision_ft.tasks import ImageClassificationTask

    return ImageClassificationTask(backbone, method=method, num_classes=3, class_names=NAMES)


def _timm():
    from vision_ft.backbones import TimmViT

    return TimmViT("vit_test_tiny")


def _open_clip():
    from vision_ft.backbones import OpenCLIP

    return OpenCLIP("open_clip_test_tiny")


def _hf_clip():
    from vision_ft.backbones import HFCLIP

    return HFCLIP("hf_clip_test_tiny")


def _native_timm(out, task, x):
    import timm

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    return model(task.backbone.preprocess(x))


def _native_open_clip_head(out, task, x):
    import open_clip

    model = open_clip.create_model(f"local-dir:{out}").eval()
    head = load_file(out / "classifier_head.safetensors")
    return model.encode_image(task.backbone.preprocess(x)) @ head["weight"].T + head["bias"]


def _native_hf_head(out, task, x):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(out).eval()
    head = load_file(out / "classifier_head.safetensors")
    features = model.get_image_features(pixel_values=task.backbone.preprocess(x)).pooler_output
    return features @ head["weight"].T + head["bias"]


def _native_open_clip_text(out, task, x):
    import open_clip

    model = open_clip.create_model(f"local-dir:{out}").eval()
    head = load_file(out / "class_text_features.safetensors")
    image = F.normalize(model.encode_image(task.backbone.preprocess(x)), dim=-1)
    return head["logit_scale"] * image @ head["text_features"].T


def _native_hf_text(out, task, x):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(out).eval()
    head = load_file(out / "class_text_features.safetensors")
    image = F.normalize(model.get_image_features(pixel_values=task.backbone.preprocess(x)).pooler_output, dim=-1)
    return head["logit_scale"] * image @ head["text_features"].T


def _clip_task(backbone, method, ood=False):
    from vision_ft.tasks import CLIPClassificationTask
    from vision_ft.tasks.clip_ood import CLIPOODTask

    cls = CLIPOODTask if ood else CLIPClassificationTask
    return cls(backbone, method=method, num_classes=3, class_names=NAMES)


def _video(method):
    from vision_ft.tasks.video import VideoPhaseTask

    return VideoPhaseTask(_timm(), method=method, num_classes=3, class_names=NAMES, temporal="mean",
                          clip={"num_frames": 2, "frame_stride": 1, "fps": 1.0})


def _native_video(out, task, x):
    import timm

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    clips = torch.stack([x, x.flip(0)], 1)  # (B, T=2, 3, H, W)
    per_frame = model(task.backbone.preprocess(clips.flatten(0, 1))).view(len(x), 2, -1)
    return per_frame.mean(1)  # the head is linear: mean of frame logits = head(mean of frame features)


def _video_logits(task, x):
    return task(torch.stack([x, x.flip(0)], 1))


PAIRS = {
    # domains/medical.yaml, domains/radio_astronomy.yaml
    "classification-timm-ssf": (lambda: _classification(_timm(), "ssf"), _native_timm, None),
    "classification-timm-lora": (lambda: _classification(_timm(), "lora"), _native_timm, None),
    # configs/backbones/open_clip_test_tiny.yaml stacked on domains/medical.yaml (the reported crash)
    "classification-open_clip-linear": (lambda: _classification(_open_clip(), "linear"), _native_open_clip_head, None),
    "classification-open_clip-ssf": (lambda: _classification(_open_clip(), "ssf"), _native_open_clip_head, None),
    "classification-open_clip-clip_lora": (lambda: _classification(_open_clip(), "clip_lora"),
                                           _native_open_clip_head, None),
    "classification-hf_clip-ssf": (lambda: _classification(_hf_clip(), "ssf"), _native_hf_head, None),
    # domains/clip_*.yaml, configs/backbones/hf_clip_test_tiny.yaml
    "clip-open_clip-clip_lora": (lambda: _clip_task(_open_clip(), "clip_lora"), _native_open_clip_text, None),
    "clip-hf_clip-clip_lora": (lambda: _clip_task(_hf_clip(), "clip_lora"), _native_hf_text, None),
    "clip_ood-open_clip-clip_lora": (lambda: _clip_task(_open_clip(), "clip_lora", ood=True),
                                     _native_open_clip_text, None),
    # domains/surgery_video.yaml (mean temporal pooling)
    "video-timm-ssf": (lambda: _video("ssf"), _native_video, _video_logits),
}


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_merged_export_loads_in_the_native_library_alone(pair, tmp_path):
    build, native, logits_of = PAIRS[pair]
    task = build().eval()
    _perturb_trainable(task)
    if hasattr(task, "_cache"):
        task._cache.clear()
    save_adapter(task, tmp_path / "run")
    trained = load_adapter(tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--merge", "--out", str(tmp_path / "out")]) == 0
    with torch.no_grad():
        expected = (logits_of or (lambda t, x: t(x)))(trained, X)
        got = native(tmp_path / "out", trained, X)
    assert expected.shape == got.shape == (len(X), 3)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    assert json.loads((tmp_path / "out" / "vision_ft.json").read_text())["merged"] is True


def test_detection_export_loads_in_transformers_alone(tmp_path):
    """domains/medical_detection.yaml with the LoRA its header documents (targets proj, fc1, fc2)."""
    from transformers import DFineForObjectDetection

    from vision_ft.backbones.dfine import DFineDetector
    from vision_ft.methods import LoRA
    from vision_ft.tasks.detection import DetectionTask

    task = DetectionTask(DFineDetector("dfine_test_tiny"), method=LoRA(targets=["proj", "fc1", "fc2"]),
                         num_classes=2, class_names=["polyp", "instrument"]).eval()
    _perturb_trainable(task)
    save_adapter(task, tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--merge", "--out", str(tmp_path / "out")]) == 0
    trained = load_adapter(tmp_path / "run")
    native = DFineForObjectDetection.from_pretrained(tmp_path / "out").eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(native(pixel_values=trained.backbone.preprocess(x)).logits, trained(x).logits,
                              atol=1e-5)


def test_a_classifier_on_a_family_without_native_export_is_refused_before_training():
    from vision_ft.backbones.dfine import DFineDetector
    from vision_ft.errors import ConfigError

    with pytest.raises(ConfigError, match="no native export of an image classifier"):
        _classification(DFineDetector("dfine_test_tiny", num_labels=2), "ssf")


def test_a_video_run_with_a_gru_is_refused_at_export_with_a_message(tmp_path, capsys):
    from vision_ft.tasks.video import VideoPhaseTask

    task = VideoPhaseTask(_timm(), method="ssf", num_classes=3, class_names=NAMES, temporal="gru")
    save_adapter(task, tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--merge", "--out", str(tmp_path / "out")]) == 2
    assert "temporal=gru has no native export" in capsys.readouterr().err
