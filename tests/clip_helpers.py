"""Shared fixtures of the CLIP tests: class names, a fixed image batch, perturbing trainable tensors."""

import torch

NAMES = ["normal", "lesion", "fibrosis", "calcification"]
X = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def perturb_trainable(model, scale=0.3, seed=1):
    """Add seeded noise to every trainable tensor (zero-initialised factors then change the output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def encode_both(backbone):
    """Image and text embeddings of ``X`` and two fixed prompts."""
    tokens = backbone.tokenize(["a photo of a lesion.", "fibrosis"])
    return backbone.encode_image(backbone.preprocess(X)), backbone.encode_text(tokens)


def open_clip_export_logits(out, images):
    """Logits of an exported CLIP task rebuilt with open_clip alone: the model from ``local-dir:OUT``
    and the zero-shot head from the class names and templates recorded in its config.
    Returns ``(logits, text_features, model)``."""
    import json

    import open_clip

    native = open_clip.create_model(f"local-dir:{out}").eval()
    cfg = json.loads((out / "open_clip_config.json").read_text())
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    names, templates = cfg["class_names"], cfg["templates"]
    with torch.no_grad():
        text = native.encode_text(tokenizer([t.format(n) for n in names for t in templates]),
                                  normalize=True).view(len(names), len(templates), -1).mean(1)
        text = torch.nn.functional.normalize(text, dim=-1)
        logits = native.logit_scale.exp() * native.encode_image(images, normalize=True) @ text.T
    return logits, text, native
