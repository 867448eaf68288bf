"""Compiling on the workstation's GPU: a ViT-B/16-sized teacher (random init) for three devices
with `--device cuda`, through the CLI. Skipped where PyTorch sees no CUDA device."""

import json
import subprocess
import sys
import time

import pytest
import torch

from coformer.runtime.manifest import load_manifest
from coformer.tools.sample_data import write_photos
from tests.tools.test_image_cli import CLASSES, DEVICES

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs an NVIDIA GPU: torch.cuda.is_available() is False here")]


def test_a_vit_base_sized_teacher_compiles_for_three_devices_on_cuda(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=len(CLASSES))
    torch.save(model.state_dict(), tmp_path / "vitb.pth")
    write_photos(tmp_path / "photos", per_class=40)
    (tmp_path / "devices.yaml").write_text(DEVICES.replace("1.0e10", "3.0e10"))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "coformer.tools.cli", "compile", "--model",
                           "timm:vit_base_patch16_224", "--checkpoint", str(tmp_path / "vitb.pth"), "--data",
                           str(tmp_path / "photos"), "--devices", str(tmp_path / "devices.yaml"), "--out",
                           str(tmp_path / "bundle"), "--epochs", "2", "--device", "cuda", "--no-progress",
                           "--report-json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["compute"]["device"] == "cuda" and report["compute"]["amp"] in ("bf16", "fp16")
    m = load_manifest(tmp_path / "bundle")
    assert len(m.devices) == 3 and m.model["shape"]["embed_dim"] == 768
    assert max(m.parity.values()) <= 1e-3  # lowered on the CPU in float32, whatever the calibration ran on
    print(f"vit_base_patch16_224, 3 devices, --device cuda: {wall:.1f} s wall "
          f"({report['wall_time_s']:.1f} s in compile)")
