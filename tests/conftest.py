"""Shared fixtures: tiny models built from configs (no downloads)."""

from __future__ import annotations

import pytest


def tiny_vit(**overrides):
    import torch
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(overrides.pop("seed", 0))
    cfg = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=48, depth=3, num_heads=4)
    cfg.update(overrides)
    return VisionTransformer(**cfg).eval()


def tiny_deit_distilled(**overrides):
    import torch
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(overrides.pop("seed", 0))
    cfg = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=48, depth=3, num_heads=4)
    cfg.update(overrides)
    model = VisionTransformerDistilled(**cfg)
    # timm's init leaves biases at zero and the distillation token tiny: randomise
    # every parameter so a wrong slice cannot hide behind zeros.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture
def vit_factory():
    return tiny_vit
