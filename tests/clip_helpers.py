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
