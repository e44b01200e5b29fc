"""CoOp: learnable prompt context, only the context trains, class-token positions, counts."""

import pytest
import torch

import vision_ft.methods.coop  # noqa: F401 - registers coop
from vision_ft.backbones.open_clip import OpenCLIP
from vision_ft.errors import AdapterError, ConfigError
from vision_ft.methods.coop import CoOp
from vision_ft.tasks.clip_classification import CLIPClassificationTask

NAMES = ["normal", "lesion", "fibrosis", "calcification"]
X = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
COOP = "vision_ft.methods.coop.CoOp"


def _task(templates=("a photo of a {}.",), **coop):
    method = {"class_path": COOP, "init_args": coop} if coop else "linear"
    return CLIPClassificationTask(OpenCLIP("open_clip_test_tiny"), method=method, num_classes=4, class_names=NAMES,
                                  templates=list(templates)).eval()


def test_count_on_vit_b16_is_16_x_512():
    backbone = OpenCLIP("ViT-B-16")
    method = CoOp()
    method.apply(backbone)
    assert method.trainable_parameters(backbone) == 16 * 512 == 8192


@pytest.mark.parametrize("position,template", [("end", "a photo of a {}."), ("front", "{} a photo of a."),
                                               ("middle", "a photo {} of a.")])
def test_hand_crafted_init_reproduces_the_matching_template(position, template):
    zero_shot = _task(templates=(template,))
    coop = _task(ctx_init="a photo of a", class_token_position=position)
    assert coop.method.n_ctx == 4
    with torch.no_grad():
        assert torch.allclose(zero_shot(X), coop(X), atol=1e-4)
        assert not torch.allclose(_task(templates=("a {} photo.",))(X), coop(X), atol=1e-3)


def test_only_the_context_trains_and_the_encoders_stay_frozen():
    task = _task(class_specific=True).train()
    assert [n for n, p in task.backbone.model.named_parameters() if p.requires_grad] == ["coop_ctx"]
    assert task.backbone.model.coop_ctx.shape == (4, 16, 32)
    frozen = {k: v.clone() for k, v in task.backbone.model.state_dict().items() if k != "coop_ctx"}
    ctx = task.backbone.model.coop_ctx.detach().clone()
    opt = torch.optim.SGD([task.backbone.model.coop_ctx], lr=1.0)
    torch.nn.functional.cross_entropy(task(X), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert not torch.equal(ctx, task.backbone.model.coop_ctx)
    assert all(torch.equal(v, task.backbone.model.state_dict()[k]) for k, v in frozen.items())


def test_adapter_roundtrip_is_bitwise_and_merge_is_refused(tmp_path):
    from vision_ft.export import export_merged, load_adapter, save_adapter

    task = _task(n_ctx=8)
    with torch.no_grad():
        task.backbone.model.coop_ctx.normal_()
    save_adapter(task, tmp_path / "run")
    with torch.no_grad():
        assert torch.equal(task(X), load_adapter(tmp_path / "run")(X))
    with pytest.raises(AdapterError, match="cannot be merged"):
        export_merged(tmp_path / "run", tmp_path / "out")


def test_bad_configs_are_clear_errors():
    from conftest import make_task

    with pytest.raises(ConfigError, match="text tower"):
        make_task(COOP)
    with pytest.raises(ConfigError, match="class_token_position"):
        CoOp(class_token_position="left")
    task = _task(class_specific=True)
    with pytest.raises(ConfigError, match="no context for classes"):
        task.method.class_text_features(task.backbone, ["tumour"])
