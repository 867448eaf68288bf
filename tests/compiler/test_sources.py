"""Teachers as users have them on disk: timm checkpoints in every common wrapping, timm's local
Hugging Face folder, and the errors a wrong file gets."""

import json

import pytest
import torch

from coformer.compiler.families import adapter_for
from coformer.compiler.sources import load_teacher, source_of
from coformer.runtime.errors import CoFormerError

KWARGS = {"depth": 2}


def _deit(**kwargs):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, **{**KWARGS, **kwargs}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _same(a, b):
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        return torch.equal(a(x), b(x))


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "ddp"])
def test_a_timm_checkpoint_loads_in_any_common_wrapping(tmp_path, wrap):
    model = _deit(num_classes=7)
    state = model.state_dict()
    if wrap == "ddp":
        state = {f"module.{k}": v for k, v in state.items()}
    payload = state if wrap in ("bare", "ddp") else {wrap: state, "epoch": 3}
    torch.save(payload, tmp_path / "w.pth")
    teacher = load_teacher("timm:deit_tiny_patch16_224", tmp_path / "w.pth", json.dumps(KWARGS))
    assert teacher.num_classes == 7  # read off the checkpoint's classifier, not timm's default of 1000
    assert _same(teacher, model)
    src = source_of(teacher)
    assert src["source"] == "timm:deit_tiny_patch16_224" and len(src["checkpoint_sha256"]) == 64


def test_safetensors_and_a_swin(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1),
                              num_classes=3).eval()
    save_file(model.state_dict(), str(tmp_path / "swin.safetensors"))
    teacher = load_teacher("timm:swin_tiny_patch4_window7_224", tmp_path / "swin.safetensors",
                           {"depths": [1, 1, 1, 1]})
    assert adapter_for(teacher).name == "swin" and teacher.num_classes == 3
    assert _same(teacher, model)


def test_a_timm_folder_loads_offline_with_its_pretrained_config(tmp_path):
    from timm.models import save_for_hf

    model = _deit(num_classes=4)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                            "crop_pct": 0.95}
    save_for_hf(model, str(tmp_path / "deit"), safe_serialization=True, model_args=KWARGS)
    assert (tmp_path / "deit" / "model.safetensors").is_file()
    teacher = load_teacher(f"timm-dir:{tmp_path / 'deit'}")
    assert teacher.num_classes == 4 and _same(teacher, model)
    from coformer.calibration.images import timm_preprocessing

    record = timm_preprocessing(teacher)
    assert record["mean"] == [0.5] * 3 and record["std"] == [0.25] * 3 and record["crop_pct"] == 0.95
    assert record["input_size"] == [3, 224, 224]


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "w.pth").write_bytes(b"not a checkpoint"), "cannot be read as a state_dict"),
    (lambda d: torch.save({"other": 1}, d / "w.pth"), "holds no state_dict of tensors"),
    (lambda d: torch.save(_deit(depth=3).state_dict(), d / "w.pth"), "does not fit timm:deit_tiny_patch16_224"),
])
def test_a_wrong_checkpoint_gets_one_clear_error(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(CoFormerError, match=message):
        load_teacher("timm:deit_tiny_patch16_224", tmp_path / "w.pth", json.dumps(KWARGS))


def test_wrong_specs_are_refused_by_name(tmp_path):
    with pytest.raises(CoFormerError, match="needs --checkpoint"):
        load_teacher("timm:deit_tiny_patch16_224", None)
    with pytest.raises(CoFormerError, match="no config.json"):
        load_teacher(f"timm-dir:{tmp_path}")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "deit_tiny_patch16_224"}))
    with pytest.raises(CoFormerError, match="holds no weights"):
        load_teacher(f"timm-dir:{tmp_path}")
    with pytest.raises(CoFormerError, match="expected 'quickstart', 'quickstart:mnist', 'timm:NAME'"):
        load_teacher("resnet50")
    with pytest.raises(CoFormerError, match="--model-kwargs is not JSON"):
        load_teacher("timm:deit_tiny_patch16_224", tmp_path / "config.json", "{depth: 2}")
