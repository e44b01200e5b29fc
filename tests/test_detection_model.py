"""The D-FINE wrapper: FDR invariants of the library, loading, the Backbone surface, PEFT, loss layouts."""

from __future__ import annotations

import pytest
import torch

from vision_ft.methods import sites
from torch import nn
from transformers.loss import loss_d_fine
from transformers.models.d_fine import modeling_d_fine

from vision_ft.backbones.dfine import DFineDetector
from vision_ft.errors import BackboneError, ConfigError
from vision_ft.methods import build_method

LABELS = [{"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]])},
          {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]


def _images(n=2, size=64, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- FDR invariants of the library's functions (what the detector and our docs rely on) ------------
@pytest.mark.parametrize("up,reg_scale,bins", [(0.5, 4.0, 32), (0.5, 8.0, 32), (0.25, 4.0, 16)])
def test_weighting_function_is_strictly_increasing_antisymmetric_and_bounded(up, reg_scale, bins):
    for w in (modeling_d_fine.weighting_function(bins, torch.tensor([up]), torch.tensor([reg_scale])),
              loss_d_fine.weighting_function(bins, torch.tensor([up]), reg_scale)):
        assert w.shape == (bins + 1,)
        assert (w[1:] > w[:-1]).all(), "W(n) must be strictly increasing"
        assert torch.allclose(w, -w.flip(0), atol=1e-6), "W(n) = -W(N-n)"
        a = up * reg_scale
        assert w[bins // 2] == 0 and w[0] == pytest.approx(-2 * a) and w[-1] == pytest.approx(2 * a)
    # the model's and the loss's copies agree
    assert torch.allclose(modeling_d_fine.weighting_function(bins, torch.tensor([up]), torch.tensor([reg_scale])),
                          loss_d_fine.weighting_function(bins, torch.tensor([up]), reg_scale))


def test_zero_distance_and_uniform_distribution_decode_to_the_reference_box():
    ref = torch.tensor([[[0.5, 0.4, 0.2, 0.3], [0.1, 0.9, 0.05, 0.1]]])
    for reg_scale in (torch.tensor([4.0]), 4.0):
        assert torch.allclose(modeling_d_fine.distance2bbox(ref, torch.zeros(1, 2, 4), reg_scale), ref, atol=1e-7)
    # a zero-initialised last bbox layer gives uniform bin probabilities: the integral is 0 by antisymmetry
    config = DFineDetector("dfine_test_tiny", num_labels=2).model.config
    project = modeling_d_fine.weighting_function(config.max_num_bins, torch.tensor([config.up]),
                                                 torch.tensor([config.reg_scale]))
    offsets = modeling_d_fine.DFineIntegral(config)(torch.zeros(1, 2, 4 * (config.max_num_bins + 1)), project)
    assert offsets.abs().max() < 1e-6
    assert torch.allclose(modeling_d_fine.distance2bbox(ref, offsets, config.reg_scale), ref, atol=1e-6)


def test_fgl_targets_interpolate_the_distance_exactly_and_decode_back_to_the_box():
    up, reg_scale, bins = torch.tensor([0.5]), 4.0, 32
    w = loss_d_fine.weighting_function(bins, up, reg_scale)
    g = torch.linspace(float(w[0]) + 1e-3, float(w[-1]) - 1e-3, 101)
    index, right, left = loss_d_fine.translate_gt(g, bins, reg_scale, up)
    i = index.long()
    assert torch.allclose(w[i] * left + w[i + 1] * right, g, atol=1e-5)
    assert torch.allclose(left + right, torch.ones_like(g))
    # box -> (left bin, weights) -> distance -> box
    ref = torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2]])
    target = torch.tensor([[0.32, 0.38, 0.71, 0.66], [0.21, 0.47, 0.42, 0.73]])  # xyxy
    index, right, left = loss_d_fine.bbox2distance(ref, target, bins, reg_scale, up)
    i = index.long()
    distance = (w[i] * left + w[i + 1] * right).reshape(-1, 4)
    decoded = modeling_d_fine.distance2bbox(ref, distance, reg_scale)
    from transformers.image_transforms import center_to_corners_format

    assert torch.allclose(center_to_corners_format(decoded), target, atol=1e-5)


# ---- building, labels, loading ---------------------------------------------------------------------
def test_preset_is_tiny_seeded_and_sized_from_the_labels():
    a = DFineDetector("dfine_test_tiny", class_names=["polyp", "instrument"])
    b = DFineDetector("dfine_test_tiny", num_labels=2)
    assert sum(p.numel() for p in a.model.parameters()) < 250_000
    assert a.model.config.id2label == {0: "polyp", 1: "instrument"}
    assert a.fingerprint() == b.fingerprint()  # same seed, same weights; names are not weights
    assert a.fingerprint() != DFineDetector("dfine_test_tiny", num_labels=2, init_seed=1).fingerprint()
    assert a.model.class_embed[0].out_features == 2 and a.model.model.enc_score_head.out_features == 2


def test_labels_come_from_the_data_and_must_agree():
    det = DFineDetector("dfine_test_tiny")
    with pytest.raises(BackboneError, match="not built yet"):
        det.model
    det.configure_labels(["a", "b", "c"])
    assert det.model.config.num_labels == 3
    with pytest.raises(ConfigError, match="num_labels=3 but the data has 2"):
        det.configure_labels(["a", "b"])
    assert DFineDetector("dfine_test_tiny", id2label={0: "x", 1: "y"}).class_names == ["x", "y"]


def test_save_pretrained_checkpoint_loads_into_a_head_of_another_size(tmp_path):
    coco = DFineDetector("dfine_test_tiny", num_labels=80)
    coco.model.save_pretrained(tmp_path / "ckpt")
    det = DFineDetector("dfine_test_tiny", checkpoint=str(tmp_path / "ckpt"), class_names=["polyp", "instrument"])
    assert "local checkpoint" in det.weights_source
    theirs, ours = coco.model.state_dict(), det.model.state_dict()
    resized = {k for k in ours if ours[k].shape != theirs[k].shape}
    assert resized and all(any(p in k for p in ("class_embed", "enc_score_head", "denoising_class_embed"))
                           for k in resized)
    kept = [k for k in ours if k not in resized]
    assert all(torch.equal(ours[k], theirs[k]) for k in kept), "every class-agnostic tensor is loaded as saved"
    assert det.model.class_embed[0].weight is det.model.model.decoder.class_embed[0].weight  # ties survive
    again = DFineDetector("dfine_test_tiny", checkpoint=str(tmp_path / "ckpt"), class_names=["polyp", "instrument"])
    assert again.fingerprint() == det.fingerprint()  # new heads are seeded: adapters can be reloaded
    spec = det.spec()["init_args"]
    assert spec["checkpoint"] == str(tmp_path / "ckpt") and spec["class_names"] == ["polyp", "instrument"]
    assert DFineDetector(**spec).fingerprint() == det.fingerprint()


def test_offline_pretrained_names_the_checkpoint_key(tmp_path):
    with pytest.raises(BackboneError, match="backbone.init_args.checkpoint"):
        DFineDetector("ustc-community/dfine-small-coco", pretrained=True, num_labels=2)
    with pytest.raises(BackboneError, match="save_pretrained"):
        DFineDetector("dfine_test_tiny", checkpoint=str(tmp_path / "missing"), num_labels=2)


# ---- the Backbone surface and registry methods -------------------------------------------------------
def test_blocks_and_roles_point_at_the_attention_and_ffn_linears():
    det = DFineDetector("dfine_test_tiny", num_labels=2)
    assert det.num_encoder_blocks == 1 and det.num_blocks == 1 + 2
    assert det.module_name(0, "q") == "model.encoder.aifi.0.layers.0.self_attn.q_proj"
    assert det.module_name(1, "proj") == "model.decoder.layers.0.self_attn.o_proj"
    assert det.module_name(2, "fc2") == "model.decoder.layers.1.mlp.layers.1"
    for i in range(det.num_blocks):
        assert sites.at(det, i, "fc1").out_features == sites.at(det, i, "fc2").in_features
        assert isinstance(det.norms(i)["norm1"], nn.LayerNorm)
    assert isinstance(det.stem(), nn.Conv2d)
    with pytest.raises(BackboneError, match="no fused qkv"):
        sites.at(det, 0, "qkv")
    rt = DFineDetector("rtdetr_test_tiny", num_labels=2)
    assert rt.module_name(rt.num_blocks - 1, "fc1") == "model.decoder.layers.1.mlp.fc1"


def test_ssf_refuses_the_detector_with_a_reason():
    det = DFineDetector("dfine_test_tiny", num_labels=2)
    with pytest.raises(BackboneError, match="separate.*lora"):
        build_method("ssf").apply(det)


def test_lora_on_proj_fc1_fc2_trains_only_its_factors_and_merges_exactly():
    from vision_ft.methods import LoRA

    det = DFineDetector("dfine_test_tiny", num_labels=2)
    method = LoRA(r=4, targets=["proj", "fc1", "fc2"])
    method.apply(det)
    trainable = [n for n, p in det.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 3 * det.num_blocks  # A and B per target per block
    with torch.no_grad():  # make the update non-zero, then compare merged and unmerged detectors
        for n, p in det.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    det.eval()
    x = _images()
    with torch.no_grad():
        before = det(x)
        method.merge(det)
        after = det(x)
    assert not any("lora_" in k for k in det.model.state_dict())
    assert torch.allclose(before.pred_boxes, after.pred_boxes, atol=1e-5)
    assert torch.allclose(before.logits, after.logits, atol=1e-4)


# ---- loss layouts -----------------------------------------------------------------------------------
def test_library_layout_is_the_models_own_loss():
    det = DFineDetector("dfine_test_tiny", num_labels=2, config_overrides={"num_denoising": 0}).train()
    loss, terms = det.detection_loss(_images(), LABELS, layout="library")
    own = det.model(pixel_values=_images(), labels=LABELS)
    assert torch.allclose(loss, own.loss) and terms.keys() == own.loss_dict.keys()


def test_transformers_pairs_aux_boxes_with_the_next_layers_distributions():
    """What docs/detection.md reports: the library's aux entry i takes the logits/boxes of output
    i-1 (entry 0 = the pre-head) with the distributions of decoder layer i; the final layer has no FGL."""
    det = DFineDetector("dfine_test_tiny", num_labels=2, config_overrides={"num_denoising": 0, "decoder_layers": 3})
    with torch.no_grad():  # make layer outputs distinguishable from the pre-head (LQE is zero-initialised)
        for lqe in det.model.model.decoder.lqe_layers:
            lqe.reg_conf.layers[-1].bias.fill_(0.7)
    det.train()
    out = det.model(pixel_values=_images(), labels=LABELS)
    aux, logits = out.auxiliary_outputs, out.intermediate_logits  # logits: [pre, layer 0, layer 1, layer 2]
    assert torch.equal(aux[0]["logits"], logits[:, 0]) and not torch.equal(aux[0]["logits"], logits[:, 1])
    assert torch.equal(aux[0]["pred_corners"], out.intermediate_predicted_corners[:, 0])
    assert torch.equal(aux[1]["logits"], logits[:, 1])  # layer 0's scores ...
    assert torch.equal(aux[1]["pred_corners"], out.intermediate_predicted_corners[:, 1])  # ... with layer 1's bins
    assert not any(torch.equal(a["logits"], logits[:, 2]) for a in aux)  # layer 1's scores are never supervised
    assert "loss_fgl" not in out.loss_dict


def test_paper_layout_supervises_every_layer_with_its_own_distributions():
    det = DFineDetector("dfine_test_tiny", num_labels=2, config_overrides={"num_denoising": 0, "decoder_layers": 3})
    det.train()
    x = _images()
    library = det.model(pixel_values=x, labels=LABELS).loss_dict
    loss, terms = det.detection_loss(x, LABELS, layout="paper")
    assert {"loss_fgl", "loss_ddf", "loss_fgl_aux_0", "loss_fgl_aux_1", "loss_vfl_pre", "loss_giou_enc_0"} <= set(terms)
    assert not any(k.endswith("_aux_2") for k in terms)  # 3 layers: final + aux 0, 1
    assert "loss_fgl_pre" not in terms  # the pre-head has no distributions
    assert terms["loss_ddf"] == 0  # the final layer is its own teacher
    # the final layer and the encoder terms are the same in both layouts (same tensors, same matching)
    for key in ("loss_vfl", "loss_bbox", "loss_giou"):
        assert torch.allclose(terms[key], library[key])
        assert torch.allclose(terms[f"{key}_enc_0"], library[f"{key}_aux_2"])  # library: encoder after L-1 aux
    assert torch.allclose(loss, sum(terms.values()))
    loss.backward()
    assert det.model.model.decoder.layers[0].mlp.layers[0].weight.grad.abs().sum() > 0


def test_paper_layout_with_denoising_and_an_image_without_boxes():
    det = DFineDetector("dfine_test_tiny", num_labels=2)  # preset has 10 denoising queries
    assert det.model.config.num_denoising > 0
    det.train()
    labels = [LABELS[0], {"class_labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    loss, terms = det.detection_loss(_images(), labels, layout="paper")
    assert torch.isfinite(loss)
    assert {"loss_vfl_dn_0", "loss_fgl_dn_1", "loss_vfl_dn_pre"} <= set(terms)


def test_rtdetr_trains_with_the_library_loss():
    det = DFineDetector("rtdetr_test_tiny", num_labels=2).train()
    loss, terms = det.detection_loss(_images(), LABELS, layout="paper")  # no distributions: library loss
    assert torch.isfinite(loss) and "loss_vfl" in terms and not any("fgl" in k for k in terms)


def test_lora_on_separate_q_and_v_projections_of_the_detector():
    from vision_ft.backbones import DFineDetector
    from vision_ft.methods import LoRA

    det = DFineDetector("dfine_test_tiny", num_labels=2)
    LoRA(r=4, targets=["q", "v"]).apply(det)
    blocks = det.num_blocks
    # per block: q and v, each A (r x in) + B (out x r) with in = out = d_model = 32
    assert sum(p.numel() for p in det.model.parameters() if p.requires_grad) == blocks * 2 * 4 * (32 + 32)
