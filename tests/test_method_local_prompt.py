"""Local-Prompt: only local/negative prompts train, score = MCM without the regional term, the official
losses / scores / crop selection, regional features, CoOp global prompts, adapter round trip, counts."""

import math

import pytest
import torch

import vision_ft.methods.local_prompt as lp  # noqa: F401 - registers local_prompt
from vision_ft.backbones.open_clip import OpenCLIP
from vision_ft.errors import AdapterError, ConfigError
from vision_ft.methods.local_prompt import LocalPrompt
from vision_ft.tasks.clip_classification import CLIPClassificationTask

NAMES = ["normal", "lesion", "fibrosis", "calcification"]
X = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 3])
LP = "vision_ft.methods.local_prompt.LocalPrompt"
COOP = "vision_ft.methods.coop.CoOp"
SMALL = {"num_negative_prompts": 6, "top_k_train": 4, "top_k_eval": 5}


def _task(method=None, **args):
    """The real CLIP classification task (parent of the OOD task): it exposes every attribute the hooks use."""
    if method is None:
        method = {"class_path": LP, "init_args": {**SMALL, **args}}
    return CLIPClassificationTask(OpenCLIP("open_clip_test_tiny"), method=method, num_classes=4, class_names=NAMES,
                                  templates=["a photo of a {}."]).eval()


def _perturb(task, scale=0.5):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in task.backbone.model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


# --- counts and trainability ------------------------------------------------------------------
def test_count_on_vit_b16_imagenet_is_k_x_16_x_512_plus_300_x_16_x_512():
    backbone = OpenCLIP("ViT-B-16")
    method = LocalPrompt()
    method.set_class_names([f"class {i}" for i in range(1000)])  # what a CLIP task passes before apply
    method.apply(backbone)
    assert method.trainable_parameters(backbone) == 1000 * 16 * 512 + 300 * 16 * 512 == 10_649_600
    shapes = {n: tuple(p.shape) for n, p in backbone.model.named_parameters() if p.requires_grad}
    assert shapes == {"local_prompt_ctx": (1000, 16, 512), "local_prompt_neg_ctx": (300, 16, 512)}


def test_without_class_names_prompts_are_sized_for_imagenet_1k_for_counts():
    backbone = OpenCLIP("open_clip_test_tiny")  # `vision_ft methods --backbone ...` applies on a bare backbone
    method = LocalPrompt()
    method.apply(backbone)
    assert method.trainable_parameters(backbone) == (1000 + 300) * 16 * 32


def test_only_local_and_negative_prompts_get_gradients():
    task = _task().train()
    trainable = [n for n, p in task.backbone.model.named_parameters() if p.requires_grad]
    assert trainable == ["local_prompt_ctx", "local_prompt_neg_ctx"]
    loss = task.method.training_loss(task, X, Y)
    loss.backward()
    for n, p in task.backbone.model.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n
    terms = task.method.last_terms
    expected = (terms["local_prompt_regional"] + 5 * terms["local_prompt_negative"]
                + 0.5 * terms["local_prompt_diversity"])
    assert math.isclose(float(loss.detach()), expected, rel_tol=1e-5)


def test_zero_init_is_false_because_prompts_start_random_while_clip_is_untouched():
    task, zero_shot = _task(), _task(method="linear")
    with torch.no_grad():
        assert torch.equal(task(X), zero_shot(X))  # the CLIP head and encoders are never changed
    scores = task.method.ood_scores(task, X)
    assert (scores["regional"] > 0).all() and not torch.equal(scores["mcm+regional"], scores["mcm"])
    assert LocalPrompt.zero_init is False and LocalPrompt.mergeable is False


# --- scores -------------------------------------------------------------------------------------
def test_without_the_regional_term_the_score_equals_mcm_exactly():
    task = _task(regional_weight=0.0)
    with torch.no_grad():
        cos = task.image_features(X) @ task.zero_shot_features(task.seen).T
    mcm = (cos / 1.0).softmax(-1).max(-1).values  # MCM, T = 1 on the cosine (official eval --T 1)
    scores = task.method.ood_scores(task, X)
    assert torch.equal(scores["mcm+regional"], mcm) and torch.equal(scores["mcm"], mcm)
    task1 = _task()  # same base weights and seed; the regional term is what differs
    s1 = task1.method.ood_scores(task1, X)
    assert torch.equal(s1["mcm"], mcm)
    assert torch.allclose(s1["mcm+regional"], mcm + s1["regional"], atol=0)
    assert not torch.allclose(s1["mcm+regional"], mcm)


def test_ood_scores_cover_every_id_class_and_use_the_task_mcm_temperature():
    task = CLIPClassificationTask(OpenCLIP("open_clip_test_tiny"), method={"class_path": LP, "init_args": SMALL},
                                  num_classes=4, class_names=NAMES,
                                  held_out_classes=["fibrosis", "calcification"]).eval()
    task.mcm_temperature = 0.5  # as CLIPOODTask exposes it
    with torch.no_grad():
        cos = task.image_features(X) @ task.zero_shot_features([0, 1, 2, 3]).T
    assert len(task.seen) == 2
    assert torch.allclose(task.method.ood_scores(task, X)["mcm"], (cos / 0.5).softmax(-1).max(-1).values, atol=1e-6)
    assert task.method.id_logits(task, X).shape == (4, 2)  # the ID classifier covers the trained classes


def test_the_ood_task_mcm_and_ours_agree_without_the_regional_term():
    clip_ood = pytest.importorskip("vision_ft.tasks.clip_ood")
    task = clip_ood.CLIPOODTask(OpenCLIP("open_clip_test_tiny"), method={"class_path": LP, "init_args": {
        **SMALL, "regional_weight": 0.0}}, num_classes=4, class_names=NAMES).eval()
    with torch.no_grad():
        theirs = task.mcm(task.image_features(X) @ task.text_head([0, 1, 2, 3]).T)
    ours = task.method.ood_scores(task, X)
    assert torch.allclose(ours["mcm+regional"], theirs, atol=1e-6) and torch.equal(ours["mcm+regional"], ours["mcm"])


def test_regional_score_is_the_mean_of_the_top_k_region_class_softmax_entries():
    g = torch.Generator().manual_seed(5)
    id_cos, neg_cos = torch.randn(3, 7, 4, generator=g), torch.randn(3, 7, 5, generator=g)
    for k in (1, 10, 28, 100):
        got = lp.regional_score(id_cos, neg_cos, k, temperature=0.5)
        for b in range(3):
            entries = []
            for n in range(7):
                z = sum(math.exp(v / 0.5) for v in id_cos[b, n].tolist() + neg_cos[b, n].tolist())
                entries += [math.exp(v / 0.5) / z for v in id_cos[b, n].tolist()]
            top = sorted(entries, reverse=True)[:min(k, 28)]
            assert math.isclose(float(got[b]), sum(top) / len(top), rel_tol=1e-5)


def test_id_logits_are_the_log_of_the_official_global_times_local_product():
    task = _task()
    global_cos, id_cos, _ = task.method._similarities(task, X, task.seen)
    k = task.method.top_k_eval
    official = torch.exp(global_cos) * torch.exp(id_cos / 1.0).topk(k, dim=1).values.mean(1)
    logits = task.method.id_logits(task, X)
    assert torch.allclose(logits.exp(), official, rtol=1e-5)
    assert torch.equal(logits.argmax(-1), official.argmax(-1))


# --- training losses, crops ----------------------------------------------------------------------
def _official_regional(a, bn, labels, k, t):
    """Per-sample literal form of the official calculate_loss_local (common factor, exp, sums)."""
    out = []
    for b in range(a.shape[0]):
        own = sorted(a[b, :, labels[b]].tolist(), reverse=True)[:k]
        c = own[0]
        num = sum(math.exp((v - c) / t) for v in own)
        den = 0.0
        for m in (a, bn):
            for col in range(m.shape[2]):
                den += sum(math.exp((v - c) / t) for v in sorted(m[b, :, col].tolist(), reverse=True)[:k])
        out.append(-math.log(num / den))
    return sum(out) / len(out)


def _official_negative(d, c_, labels, k, t):
    """Per-sample literal form of the official calculate_loss_local_neg."""
    out = []
    for b in range(d.shape[0]):
        own = c_[b, :, labels[b]].tolist()
        where = sorted(range(len(own)), key=lambda i: -own[i])[:k]
        pos = [v for i in where for v in d[b, i].tolist()]
        ref = pos[0]
        num = sum(math.exp((v - ref) / t) for v in pos)
        den = num + sum(math.exp((v - ref) / t) for col in range(c_.shape[2])
                        for v in sorted(c_[b, :, col].tolist(), reverse=True)[:k])
        out.append(-math.log(num / den))
    return sum(out) / len(out)


@pytest.mark.parametrize("k,t", [(1, 1.0), (3, 1.0), (5, 0.7)])
def test_losses_match_the_official_top_k_formulas(k, t):
    g = torch.Generator().manual_seed(k)
    a, bn = 10 * torch.randn(2, 6, 4, generator=g), 10 * torch.randn(2, 6, 3, generator=g)
    labels = torch.tensor([2, 0])
    got = lp.regional_contrastive_loss(a.double(), bn.double(), labels, k, t)
    assert math.isclose(float(got), _official_regional(a.double(), bn.double(), labels, k, t), rel_tol=1e-9)
    got = lp.negative_region_loss(bn.double(), a.double(), labels, k, t)
    assert math.isclose(float(got), _official_negative(bn.double(), a.double(), labels, k, t), rel_tol=1e-9)


def test_diversity_loss_on_a_hand_example():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])  # cosines 0, 1/sqrt2, 1/sqrt2 off the diagonal
    assert math.isclose(float(lp.diversity_loss(feats, 3)), (3 + 4 / math.sqrt(2)) / 6, rel_tol=1e-6)
    assert math.isclose(float(lp.diversity_loss(feats, 300)), (3 + 4 / math.sqrt(2)) / (300 * 299), rel_tol=1e-6)


@pytest.mark.parametrize("on", ["negative", "local"])
def test_diversity_term_is_taken_on_the_configured_prompts(on):
    task = _task(diversity_on=on).train()
    task.method.training_loss(task, X, Y)
    with torch.no_grad():
        local, neg = task.method.local_text_features(task.backbone, NAMES)
    expected = lp.diversity_loss(neg if on == "negative" else local, 6)
    assert math.isclose(task.method.last_terms["local_prompt_diversity"], float(expected), rel_tol=1e-5)


def test_crops_are_scored_against_the_true_class_and_the_best_and_worst_are_chosen():
    crops = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [3.0, 0.0]]])  # (2 crops, 2 images, D)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    sim = lp.score_crops(crops, text, torch.tensor([1, 2]))
    assert torch.allclose(sim, torch.tensor([[0.0, 0.0], [1 / math.sqrt(2), -1.0]]))
    sim = torch.tensor([[0.1, 0.9], [0.5, 0.2], [0.3, 0.4], [0.7, 0.1]])
    positives, negative = lp.select_crops(sim, 2)
    assert positives.tolist() == [[3, 0], [1, 2]] and negative.tolist() == [0, 3]


def test_random_resized_crops_follow_the_sampler_and_reproduce_a_full_box():
    g = torch.Generator().manual_seed(0)
    boxes = lp.crop_boxes(4000, 32, 48, (0.08, 1.0), generator=g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 48).all() and (boxes[:, 3] <= 32).all()
    area = w * h / (32 * 48)
    assert area.min() >= 0.06 and area.max() <= 1.0 and area.std() > 0.1  # 0.08 up to rounding
    assert (w / h).min() >= 0.7 and (w / h).max() <= 1.4
    same = lp.random_resized_crops(X, 3, (32, 32), scale=(1.0, 1.0), flip=False)
    assert same.shape == (12, 3, 32, 32) and torch.allclose(same, X.repeat(3, 1, 1, 1), atol=1e-6)
    flipped = lp.random_resized_crops(X, 8, (32, 32), scale=(1.0, 1.0), generator=g).view(8, 4, 3, 32, 32)
    assert all(torch.allclose(c, X[b], atol=1e-6) or torch.allclose(c, X[b].flip(-1), atol=1e-6)
               for crop in flipped for b, c in enumerate(crop))


def test_the_clip_task_trains_on_the_method_loss_instead_of_its_frozen_cross_entropy():
    task = _task().train()
    batch = {"image": X, "label": Y}
    torch.manual_seed(0)
    ref = task.method.training_loss(task, X, Y)
    torch.manual_seed(0)
    losses = []
    task.checked_loss = losses.append  # the loss the step would optimise; returning None ends the step
    assert task.training_step(batch, 0) is None
    assert losses[0].requires_grad and torch.allclose(losses[0], ref)


# --- regional image features --------------------------------------------------------------------
def test_local_features_come_from_the_backbone_in_one_pass():
    backbone = OpenCLIP("open_clip_test_tiny").eval()
    x = backbone.preprocess(X)
    with torch.no_grad():
        pooled, dense = lp.global_and_dense(backbone, x)
        assert torch.equal(pooled, backbone.encode_image(x)) and torch.equal(dense, backbone.dense_features(x))
    assert dense.shape == (4, 16, 32)


# --- CoOp global prompts, adapters -----------------------------------------------------------------
def test_global_prompts_are_swapped_for_a_trained_coop_context(tmp_path):
    from vision_ft.export import save_adapter

    coop = _task(method={"class_path": COOP, "init_args": {"n_ctx": 4}})
    with torch.no_grad():
        coop.backbone.model.coop_ctx.normal_()
    save_adapter(coop, tmp_path / "coop")
    task = _task(global_prompts=str(tmp_path / "coop"))
    with torch.no_grad():
        head = coop.text_head(list(range(4)))
        feats = task.method.global_text_features(task, list(range(4)))
        assert torch.allclose(feats, head, atol=1e-6)
        mcm = (task.image_features(X) @ head.T).softmax(-1).max(-1).values
    scores = task.method.ood_scores(task, X)
    assert torch.allclose(scores["mcm"], mcm, atol=1e-6)
    plain = _task()
    assert not torch.allclose(scores["mcm"], plain.method.ood_scores(plain, X)["mcm"], atol=1e-6)
    holder = task.backbone.model.local_prompt_global.coop_ctx
    task.train()
    task.method.training_loss(task, X, Y).backward()
    assert not holder.requires_grad and holder.grad is None
    assert "local_prompt_global.coop_ctx" in task.method.adapter_state_dict(task.backbone)
    assert task.method.trainable_parameters(task.backbone) == (4 + 6) * 16 * 32
    with pytest.raises(ConfigError, match="global_prompts"):
        _task(global_prompts=str(tmp_path / "nowhere"))
    save_adapter(task, tmp_path / "lp")
    with pytest.raises(ConfigError, match="is a 'local_prompt' run"):
        _task(global_prompts=str(tmp_path / "lp"))


def test_adapter_roundtrip_on_a_fresh_apply_is_bitwise_and_merge_is_refused(tmp_path):
    from vision_ft.export import export_merged, load_adapter, save_adapter

    task = _task()
    _perturb(task)
    save_adapter(task, tmp_path / "run")
    loaded = load_adapter(tmp_path / "run")
    assert type(loaded.method) is LocalPrompt and loaded.method is not task.method
    ours, theirs = task.method.ood_scores(task, X), loaded.method.ood_scores(loaded, X)
    assert all(torch.equal(ours[k], theirs[k]) for k in ("mcm", "regional", "mcm+regional"))
    assert torch.equal(task.method.id_logits(task, X), loaded.method.id_logits(loaded, X))
    with pytest.raises(AdapterError, match="cannot be merged"):
        export_merged(tmp_path / "run", tmp_path / "out")


def test_cached_prompt_features_follow_updates():
    task = _task()
    before = task.method.ood_scores(task, X)["regional"]
    assert torch.equal(task.method.ood_scores(task, X)["regional"], before)
    _perturb(task)  # an in-place update (as an optimiser step) invalidates the cached text features
    assert not torch.equal(task.method.ood_scores(task, X)["regional"], before)


def test_bad_configs_are_clear_errors():
    from conftest import make_task

    with pytest.raises(ConfigError, match="text tower"):
        make_task(LP)
    with pytest.raises(ConfigError, match="num_crops"):
        LocalPrompt(num_crops=8, num_positive=8)
    with pytest.raises(ConfigError, match="crop_scale"):
        LocalPrompt(crop_scale=[0.5, 0.1])
    with pytest.raises(ConfigError, match="temperature"):
        LocalPrompt(temperature=0)
    with pytest.raises(ConfigError, match="diversity_on"):
        LocalPrompt(diversity_on="both")
    task = _task()
    with pytest.raises(ConfigError, match="no local prompt for classes"):
        task.method.local_text_features(task.backbone, ["tumour"])
