"""Shared fixtures: tiny models built from configs (no downloads)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

# This user's operator key (every compile signs with it; coformer serve checks it): the suite's
# own, made afresh in a folder of its own, never the key of the user running the tests; removed
# when the run ends (it holds a secret key)
os.environ["COFORMER_CONFIG_DIR"] = tempfile.mkdtemp(prefix="coformer-test-config-")
atexit.register(shutil.rmtree, os.environ["COFORMER_CONFIG_DIR"], True)


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


@pytest.fixture(scope="session")
def quickstart_fast(tmp_path_factory):
    """One ``coformer quickstart --fast --compare`` run (console script, emulated devices throttled
    by duty cycle; --compare for the search baselines and the probe calibration), shared by the quickstart and bench tests: ``(out dir, env, report, result)``.
    The env's COFORMER_CACHE_DIR holds its teacher. It costs about a minute, so it runs once."""
    import json
    import os
    import subprocess

    from tests.tools.test_quickstart import _coformer

    base = tmp_path_factory.mktemp("quickstart")
    env = {**os.environ, "COFORMER_CACHE_DIR": str(base / "cache")}
    done = subprocess.run([_coformer(), "quickstart", "--fast", "--out", str(base / "qs"), "--report-json",
                           str(base / "r.json"), "--no-progress", "--throttle", "duty-cycle", "--compare"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return base / "qs", env, json.loads((base / "r.json").read_text()), done
