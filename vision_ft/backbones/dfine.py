"""D-FINE and RT-DETR detectors (transformers) behind the :class:`~vision_ft.backbones.base.Backbone` surface.

The wrapped model is ``DFineForObjectDetection`` / ``RTDetrForObjectDetection`` /
``RTDetrV2ForObjectDetection``, untouched in type, so ``save_pretrained`` exports it in
transformers' native format and the library's own loss trains it.

Where registry methods act (``blocks``)
    Blocks ``0 .. E-1`` are the transformer layers of the hybrid encoder's AIFI module
    (``model.encoder.aifi[j].layers[k]``: self-attention on the stride-32 feature map + FFN);
    blocks ``E .. E+D-1`` are the decoder layers (``model.decoder.layers[i]``: query
    self-attention, deformable cross-attention, FFN). The roles are the self-attention
    projections ``q``, ``k``, ``v`` (separate ``q_proj``/``k_proj``/``v_proj``), ``proj``
    (``o_proj``) and the FFN ``fc1``/``fc2``; ``norm1``/``norm2`` are ``self_attn_layer_norm``
    / ``final_layer_norm``. The deformable cross-attention (sampling offsets, attention
    weights), the CNN backbone, the FPN/PAN convolutions and the prediction heads have no
    role: the task's ``freeze`` policy decides whether they train.

    There is no fused ``qkv`` projection (queries and keys take position-embedded input,
    values do not), so methods written for a fused ``qkv`` output (SSF's paper placement,
    PEGO, SPT, SNELL...) refuse this backbone with a :class:`BackboneError` naming the
    alternatives; LoRA applies by module names.

Labels
    ``num_labels``/``class_names`` usually come from the data: the detection task calls
    :meth:`DFineDetector.configure_labels` before anything else, and the model is built then.
    A checkpoint trained on another label set (COCO's 80 classes, Objects365's 365) is loaded
    with ``ignore_mismatched_sizes=True``: every class-dependent tensor (decoder and encoder
    score heads, the denoising label embedding) is re-initialised (seeded by ``init_seed``), all
    else is kept.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BackboneError, ConfigError, first_line
from .base import Backbone, WeightRef

log = logging.getLogger("vision_ft")

SUPPORTED_MODEL_TYPES = ("d_fine", "rt_detr", "rt_detr_v2")

#: Tiny architectures for tests and the offline sample: name -> (model_type, backbone config, config).
TINY_PRESETS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    # ~0.19M parameters; ~30 ms per training step (batch 2, 64 px) on one CPU core
    "dfine_test_tiny": (
        "d_fine",
        dict(stem_channels=[3, 8, 16], stage_in_channels=[16, 32, 64, 128], stage_mid_channels=[8, 16, 32, 64],
             stage_out_channels=[32, 64, 128, 128], stage_num_blocks=[1, 1, 1, 1],
             stage_downsample=[False, True, True, True], stage_light_block=[False, False, True, True],
             stage_kernel_size=[3, 3, 5, 5], stage_numb_of_layers=[2, 2, 2, 2], embedding_size=16,
             hidden_sizes=[32, 64, 128, 128], depths=[1, 1, 1, 1]),
        dict(encoder_hidden_dim=32, encoder_in_channels=[64, 128, 128], encoder_ffn_dim=64,
             encoder_attention_heads=2, d_model=32, num_queries=30, decoder_in_channels=[32, 32, 32],
             decoder_ffn_dim=64, decoder_n_points=[2, 2, 2], decoder_layers=2, decoder_attention_heads=2,
             num_denoising=10, depth_mult=0.34, hidden_expansion=0.5, lqe_hidden_dim=16, image_size=64),
    ),
    # ~0.6M parameters: the medical detection sample at 128 px
    "dfine_test_small": (
        "d_fine",
        dict(stem_channels=[3, 16, 16], stage_in_channels=[16, 32, 96, 192], stage_mid_channels=[16, 32, 48, 96],
             stage_out_channels=[32, 96, 192, 256], stage_num_blocks=[1, 1, 1, 1],
             stage_downsample=[False, True, True, True], stage_light_block=[False, False, True, True],
             stage_kernel_size=[3, 3, 5, 5], stage_numb_of_layers=[2, 2, 2, 2], embedding_size=16,
             hidden_sizes=[32, 96, 192, 256], depths=[1, 1, 1, 1]),
        dict(encoder_hidden_dim=64, encoder_in_channels=[96, 192, 256], encoder_ffn_dim=128,
             encoder_attention_heads=4, d_model=64, num_queries=50, decoder_in_channels=[64, 64, 64],
             decoder_ffn_dim=128, decoder_n_points=[3, 6, 3], decoder_layers=3, decoder_attention_heads=4,
             num_denoising=20, depth_mult=0.34, hidden_expansion=0.5, lqe_hidden_dim=32, image_size=128),
    ),
    "rtdetr_test_tiny": (
        "rt_detr",
        dict(embedding_size=8, hidden_sizes=[32, 64, 128, 128], depths=[1, 1, 1, 1], layer_type="bottleneck"),
        dict(encoder_hidden_dim=32, encoder_in_channels=[64, 128, 128], encoder_ffn_dim=64,
             encoder_attention_heads=2, d_model=32, num_queries=30, decoder_in_channels=[32, 32, 32],
             decoder_ffn_dim=64, decoder_n_points=2, decoder_layers=2, decoder_attention_heads=2,
             num_denoising=0, image_size=64),
    ),
}

#: Role -> module path inside one block, per model family.
_ROLE_PATHS = {
    "d_fine": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "proj": "self_attn.o_proj", "fc1": "mlp.layers.0", "fc2": "mlp.layers.1"},
    "rt_detr": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "proj": "self_attn.o_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"},
}
_ROLE_PATHS["rt_detr_v2"] = _ROLE_PATHS["rt_detr"]

#: Parameter-name prefixes (inside ``self.model``) of the parts the freeze policy talks about.
PART_PREFIXES = {
    "backbone": ("model.backbone.",),
    "encoder": ("model.encoder_input_proj.", "model.encoder."),
    # whatever depends on the number of classes: always trained when the head is new
    "class_heads": ("class_embed.", "model.decoder.class_embed.", "model.enc_score_head.",
                    "model.denoising_class_embed."),
}

_NO_QKV = ("D-FINE/RT-DETR attention has no fused qkv projection: q_proj, k_proj and v_proj are separate "
           "(queries and keys take position-embedded input, values do not). Roles here: q k v proj fc1 fc2. "
           "Methods placed after a fused qkv output (ssf, pego, spt, snell...) do not apply to this detector: "
           "use method lora with targets [proj, fc1, fc2], or method linear with the task's freeze policy "
           "(model.init_args.freeze).")


def _model_classes(model_type: str):
    import transformers as tf

    return {"d_fine": (tf.DFineConfig, tf.HGNetV2Config, tf.DFineForObjectDetection),
            "rt_detr": (tf.RTDetrConfig, tf.RTDetrResNetConfig, tf.RTDetrForObjectDetection),
            "rt_detr_v2": (tf.RTDetrV2Config, tf.RTDetrResNetConfig, tf.RTDetrV2ForObjectDetection)}[model_type]


class DFineDetector(Backbone):
    """A D-FINE (or RT-DETR / RT-DETRv2) detector from transformers.

    Args:
        name: hub id (``ustc-community/dfine-{nano,small,medium,large,xlarge}-coco``,
            ``ustc-community/dfine-{small,medium,xlarge}-obj2coco`` (Objects365 → COCO),
            ``ustc-community/dfine_{s,m,l,x}_obj365``, ``PekingU/rtdetr_r50vd``...) or a tiny
            preset (``dfine_test_tiny``, ``dfine_test_small``, ``rtdetr_test_tiny``).
        pretrained: load the hub weights of ``name`` (needs hub access or the hub cache).
        checkpoint: a local folder written by ``save_pretrained`` (``config.json`` +
            ``model.safetensors``); takes precedence over ``name``/``pretrained``.
        num_labels: number of classes; normally left unset and taken from the data.
        class_names: class names in label order (``id2label``); normally from the data.
        id2label: alternative to ``class_names`` (``{0: "polyp", 1: "instrument"}``).
        image_size: square input size the detector runs at (D-FINE: 640; presets: their own).
        config_overrides: extra config values (``num_queries``, ``num_denoising``,
            ``decoder_layers``...), applied to presets and to loaded checkpoints alike.
        init_seed: seed of every random initialisation (random models, new class heads), so
            the frozen base is rebuilt identically when an adapter is loaded.
    """

    def __init__(
        self,
        name: str = "ustc-community/dfine-small-coco",
        pretrained: bool = False,
        checkpoint: str | None = None,
        num_labels: int | None = None,
        class_names: list[str] | None = None,
        id2label: dict[int, str] | None = None,
        image_size: int | None = None,
        config_overrides: dict[str, Any] | None = None,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        self.name, self.pretrained, self.checkpoint = name, pretrained, checkpoint
        self.config_overrides = dict(config_overrides or {})
        self.init_seed = init_seed
        if id2label is not None:
            if class_names is not None:
                raise ConfigError("set backbone.init_args.class_names or id2label, not both")
            keys = sorted(int(k) for k in id2label)
            if keys != list(range(len(keys))):
                raise ConfigError(f"backbone.init_args.id2label keys must be 0..K-1, got {keys}")
            class_names = [str(id2label[k] if k in id2label else id2label[str(k)]) for k in keys]
        if class_names is not None and num_labels is not None and len(class_names) != num_labels:
            raise ConfigError(f"backbone.init_args.num_labels={num_labels} but {len(class_names)} class_names")
        self.num_labels = num_labels if num_labels is not None else (len(class_names) if class_names else None)
        self.class_names = list(class_names) if class_names else None
        preset = TINY_PRESETS.get(name)
        self.image_size = int(image_size or (preset[2]["image_size"] if preset else 640))
        self.input_size = (self.image_size, self.image_size)
        self.model_type: str | None = None
        if self.num_labels is not None:
            self._build()

    # --- labels and loading --------------------------------------------------------------------
    def configure_labels(self, class_names: list[str]) -> None:
        """Set the label space from the data; builds the model on first call."""
        class_names = [str(c) for c in class_names]
        if "model" not in self._modules:
            self.num_labels, self.class_names = len(class_names), class_names
            self._build()
            return
        if len(class_names) != self.num_labels:
            raise ConfigError(
                f"backbone.init_args.num_labels={self.num_labels} but the data has {len(class_names)} classes; "
                "leave num_labels unset (the task takes it from the data)")
        self.class_names = class_names
        self.model.config.id2label = dict(enumerate(class_names))
        self.model.config.label2id = {n: i for i, n in enumerate(class_names)}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise BackboneError(
                    "the detector is not built yet: its class count comes from the data. Use it inside a "
                    "DetectionTask (which calls configure_labels), or set backbone.init_args.num_labels"
                ) from None
            raise

    def _label_kwargs(self) -> dict[str, Any]:
        names = self.class_names or [f"class_{i}" for i in range(self.num_labels)]
        return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}

    def _build(self) -> None:
        if self.num_labels is None or self.num_labels < 1:
            raise ConfigError(f"a detector needs num_labels >= 1, got {self.num_labels}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            if self.checkpoint:
                model = self._from_pretrained(_checkpoint_dir(self.checkpoint), f"local checkpoint {self.checkpoint}")
            elif self.name in TINY_PRESETS:
                model = self._from_preset()
            elif self.pretrained:
                model = self._from_pretrained(self.name, f"pretrained {self.name} (hub)")
            else:
                model = self._random_from_hub_config()
        model_type = model.config.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise BackboneError(f"{self.name or self.checkpoint!r} is a {model_type!r} model; "
                                f"backbone.init_args.name must be one of {SUPPORTED_MODEL_TYPES}")
        self.model_type = model_type
        self.model = _answer_no_input_embeddings(model)

    def _from_preset(self) -> nn.Module:
        model_type, backbone_args, config_args = TINY_PRESETS[self.name]
        config_cls, backbone_cls, model_cls = _model_classes(model_type)
        backbone_config = backbone_cls(**backbone_args, out_features=["stage2", "stage3", "stage4"],
                                       out_indices=[2, 3, 4])
        args = {k: v for k, v in config_args.items() if k != "image_size"}
        config = config_cls(backbone_config=backbone_config, **{**args, **self.config_overrides},
                            **self._label_kwargs())
        self.weights_source = (f"random init (seed {self.init_seed}) of the tiny preset {self.name}: no pretrained "
                               "weights; set backbone.init_args.name to a hub id with pretrained=true, or "
                               "backbone.init_args.checkpoint=/path/to/save_pretrained_dir")
        return _kaiming_cnn(model_cls(config))

    def _from_pretrained(self, source: str | Path, description: str) -> nn.Module:
        from transformers import AutoModelForObjectDetection

        try:
            model = AutoModelForObjectDetection.from_pretrained(
                str(source), ignore_mismatched_sizes=True, **self._label_kwargs(), **self.config_overrides)
        except Exception as e:  # hub unreachable, cache empty, not a detector folder
            if self.checkpoint:
                raise BackboneError(f"backbone.init_args.checkpoint={self.checkpoint!r} cannot be loaded as a "
                                    f"transformers detector ({type(e).__name__}: {first_line(e)})") from None
            raise BackboneError(
                f"pretrained weights for {self.name!r} are not reachable ({type(e).__name__}: {first_line(e)}). "
                "Offline, set backbone.init_args.checkpoint=/path/to/dir (a folder written by save_pretrained, "
                "e.g. a copy of the hub repo) or backbone.init_args.pretrained=false") from None
        self.weights_source = (f"{description}; class heads re-initialised for {self.num_labels} classes "
                               "where sizes differ")
        return model

    def _random_from_hub_config(self) -> nn.Module:
        from transformers import AutoConfig, AutoModelForObjectDetection

        try:
            config = AutoConfig.from_pretrained(self.name, **self._label_kwargs(), **self.config_overrides)
        except Exception as e:
            raise BackboneError(
                f"the architecture config of {self.name!r} is not reachable ({type(e).__name__}: {first_line(e)}). "
                f"Use a tiny preset {sorted(TINY_PRESETS)} offline, or set backbone.init_args.checkpoint=/path/to/dir"
            ) from None
        self.weights_source = (f"random init (seed {self.init_seed}) of the {self.name} architecture: no pretrained "
                               "weights requested; set backbone.init_args.pretrained=true with hub access or "
                               "backbone.init_args.checkpoint=...")
        return _kaiming_cnn(AutoModelForObjectDetection.from_config(config))

    # --- structure ---------------------------------------------------------------------------------
    @property
    def block_paths(self) -> list[str]:
        """Dotted paths (inside ``self.model``) of the blocks: encoder AIFI layers, then decoder layers."""
        core = self.model.model
        paths = [f"model.encoder.aifi.{j}.layers.{k}" for j, aifi in enumerate(core.encoder.aifi)
                 for k in range(len(aifi.layers))]
        return paths + [f"model.decoder.layers.{i}" for i in range(len(core.decoder.layers))]

    @property
    def num_encoder_blocks(self) -> int:
        return sum(len(aifi.layers) for aifi in self.model.model.encoder.aifi)

    @property
    def blocks(self) -> list[nn.Module]:
        return [self.model.get_submodule(p) for p in self.block_paths]

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.d_model)

    def module_name(self, block: int, role: str) -> str:
        if role == "qkv":
            raise BackboneError(_NO_QKV)
        paths = _ROLE_PATHS[self.model_type]
        if role not in paths:
            raise KeyError(f"unknown role {role!r}; roles here: {' '.join(paths)}")
        return f"{self.block_paths[block]}.{paths[role]}"

    def weight_ref(self, block: int, role: str) -> WeightRef:
        return WeightRef(self.module_name(block, role))

    def norms(self, block: int) -> dict[str, nn.Module]:
        b = self.blocks[block]
        return {"norm1": b.self_attn_layer_norm, "norm2": b.final_layer_norm}

    def stem(self) -> nn.Module:
        """The first convolution of the CNN backbone (HGNetV2 / ResNet stem)."""
        return next(m for m in self.model.model.backbone.modules() if isinstance(m, nn.Conv2d))

    def final_norm(self) -> nn.Module:
        raise BackboneError("a detector has no final token norm before a classification head (each decoder "
                            "layer ends in its own final_layer_norm, see norms(i)); " + _NO_QKV)

    def part_of(self, name: str) -> Literal["backbone", "encoder", "decoder", "class_heads"]:
        """Which part a parameter (name inside ``self.model``) belongs to; ``decoder`` covers the
        decoder layers, the query selection and the class-agnostic box heads."""
        for part in ("class_heads", "backbone", "encoder"):
            if name.startswith(PART_PREFIXES[part]):
                return part  # type: ignore[return-value]
        return "decoder"

    # --- compute -----------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] → model input: resized to ``image_size``; D-FINE/RT-DETR take [0, 1] unnormalised."""
        if tuple(images.shape[-2:]) != self.input_size:
            images = F.interpolate(images, size=self.input_size, mode="bilinear", align_corners=False,
                                   antialias=True).clamp(0.0, 1.0)
        return images

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean over queries, decoder query features (B, num_queries, d_model))."""
        tokens = self.model.model(pixel_values=x).last_hidden_state
        return tokens.mean(1), tokens

    def forward(self, x: torch.Tensor):
        return self.model(pixel_values=x)

    def detection_loss(self, pixel_values: torch.Tensor, labels: list[dict[str, torch.Tensor]],
                       layout: Literal["paper", "library"] = "paper") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss and its named terms, computed by transformers' own criterion.

        ``library``: exactly ``model(pixel_values, labels=labels)`` (transformers' pairing of
        decoder outputs with auxiliary targets). ``paper``: the same criterion class
        (``DFineLoss``) fed the outputs paired as in the official D-FINE code — every decoder
        layer with its own distributions, FGL on the final layer, the pre-head and encoder
        outputs as separate terms (see docs/detection.md). RT-DETR has no distributions, so
        both layouts are the library's loss there.
        """
        if layout == "library" or self.model_type != "d_fine":
            out = self.model(pixel_values=pixel_values, labels=labels)
            return out.loss, dict(out.loss_dict)
        if layout != "paper":
            raise ConfigError(f"loss layout must be 'paper' or 'library', got {layout!r}")
        return paper_layout_loss(self.model, pixel_values, labels)

    @torch.no_grad()
    def detect(self, pixel_values: torch.Tensor, target_sizes: torch.Tensor, max_detections: int = 100,
               threshold: float = 0.0) -> list[dict[str, torch.Tensor]]:
        """Per image: ``scores``, ``labels`` (contiguous) and ``boxes`` (x0, y0, x1, y1 in the pixels of
        ``target_sizes`` (h, w)), best first, via the image processor's ``post_process_object_detection``."""
        outputs = self.model(pixel_values=pixel_values)
        processor = getattr(self, "_post_processor", None)
        if processor is None:  # only its post-processing is used (D-FINE's processor class)
            from transformers import RTDetrImageProcessor

            processor = self._post_processor = RTDetrImageProcessor(do_resize=False)
        results = processor.post_process_object_detection(outputs, threshold=threshold,
                                                          target_sizes=target_sizes.to(outputs.logits.device),
                                                          use_focal_loss=True)
        return [{k: v[:max_detections] for k, v in r.items()} for r in results]

    # --- identity ------------------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        return {
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "init_args": dict(name=self.name, pretrained=self.pretrained, checkpoint=self.checkpoint,
                              num_labels=self.num_labels, class_names=self.class_names,
                              image_size=self.image_size, config_overrides=self.config_overrides,
                              init_seed=self.init_seed),
        }


def paper_layout_loss(model: nn.Module, pixel_values: torch.Tensor,
                      labels: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """D-FINE loss with transformers' ``DFineLoss`` over outputs paired as in the official code.

    Key names: plain (final layer), ``_aux_i`` (decoder layer ``i`` < L-1), ``_pre`` (the
    first layer's traditional box head), ``_enc_0`` (encoder top-k), ``_dn_i`` / ``_dn_pre``
    (denoising groups).
    """
    from transformers.loss.loss_d_fine import DFineLoss

    core = model.model(pixel_values=pixel_values, labels=labels)
    logits, boxes = core.intermediate_logits, core.intermediate_reference_points.clamp(0, 1)
    corners, refs = core.intermediate_predicted_corners, core.initial_reference_points
    n_layers = corners.shape[1]
    if logits.shape[1] != n_layers + 1:
        raise RuntimeError("paper loss layout needs the training-mode outputs (pre-head + every decoder layer); "
                           "call it with the model in train mode")
    dn_meta = core.denoising_meta_values

    def split(t: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        if dn_meta is None:
            return None, t
        dn, normal = torch.split(t, dn_meta["dn_num_split"], dim=2)
        return dn, normal

    (dn_logits, logits), (dn_boxes, boxes) = split(logits), split(boxes)
    (dn_corners, corners), (dn_refs, refs) = split(corners), split(refs)

    def layers(lg, bx, cr, rf) -> list[dict[str, torch.Tensor]]:
        teacher_corners, teacher_logits = cr[:, -1], lg[:, -1]  # the final layer teaches (GO-LSD)
        return [{"logits": lg[:, 1 + i], "pred_boxes": bx[:, 1 + i], "pred_corners": cr[:, i], "ref_points": rf[:, i],
                 "teacher_corners": teacher_corners, "teacher_logits": teacher_logits} for i in range(n_layers)]

    decoder = layers(logits, boxes, corners, refs)
    pre = {"logits": logits[:, 0], "pred_boxes": boxes[:, 0]}
    enc = {"logits": core.enc_topk_logits, "pred_boxes": core.enc_topk_bboxes.clamp(0, 1)}
    outputs: dict[str, Any] = {**decoder[-1], "auxiliary_outputs": decoder[:-1] + [pre, enc]}
    names = [f"_aux_{i}" for i in range(n_layers - 1)] + ["_pre", "_enc_0"]
    dn_names: list[str] = []
    if dn_meta is not None:
        dn_decoder = layers(dn_logits, dn_boxes, dn_corners, dn_refs)
        outputs["dn_auxiliary_outputs"] = dn_decoder + [{"logits": dn_logits[:, 0], "pred_boxes": dn_boxes[:, 0]}]
        outputs["denoising_meta_values"] = dn_meta
        dn_names = [f"_dn_{i}" for i in range(n_layers)] + ["_dn_pre"]
    criterion = DFineLoss(model.config).to(pixel_values.device)
    raw = criterion(outputs, labels)
    terms: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        base, _, rest = key.partition("_aux_")
        if rest:
            key = base + names[int(rest)]
        else:
            base, _, rest = key.partition("_dn_")
            if rest:
                key = base + dn_names[int(rest)]
        terms[key] = value
    return sum(terms.values()), terms


def _answer_no_input_embeddings(model: nn.Module) -> nn.Module:
    """Let peft inject LoRA: it asks every transformers model with tied weights for its input
    embeddings (to find weights tied to them); a detector has none and transformers raises
    ``NotImplementedError``. An empty module answers "nothing is tied to input embeddings", which
    is true (D-FINE's ties are between its class/box heads and their decoder aliases). Set on the
    instance only: the model keeps its class and its saved format."""
    empty = nn.ModuleDict()
    object.__setattr__(model, "get_input_embeddings", lambda: empty)
    return model


def _kaiming_cnn(model: nn.Module) -> nn.Module:
    """Random init only: Kaiming-normal (fan-out, ReLU) weights for the CNN backbone's convolutions.

    transformers initialises every convolution N(0, initializer_range = 0.01) because the
    backbone is meant to be loaded pretrained; its batch norms are frozen to the identity, so a
    randomly initialised HGNetV2 then passes on vanishing activations (measured on the tiny
    preset: stride-32 feature variance ~1e-30, i.e. the detector cannot see the image).
    """
    with torch.no_grad():
        for module in model.model.backbone.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    return model


def _checkpoint_dir(checkpoint: str) -> Path:
    path = Path(os.path.expanduser(checkpoint))
    if not path.is_dir() or not (path / "config.json").is_file():
        raise BackboneError(f"backbone.init_args.checkpoint={checkpoint!r} must be a folder written by "
                            "save_pretrained (config.json + model.safetensors)")
    return path
