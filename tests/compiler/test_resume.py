"""An interrupted compile resumes from its calibration checkpoints, and ends as an
uninterrupted one would."""

import pytest
import torch

from coformer.calibration.booster import BoostConfig
from coformer.calibration.data import load_digits_dataset
from coformer.compiler.specs import DeviceSpec
from tests.conftest import tiny_vit

DEVICES = [DeviceSpec("a", 1 << 30, 10**9, cpu_share=1.0), DeviceSpec("b", 1 << 30, 10**9, cpu_share=0.5)]


def _compile(out, ckpt, **kw):
    from coformer.compiler import pipeline

    torch.manual_seed(0)
    return pipeline.compile_bundle(tiny_vit(), DEVICES, load_digits_dataset(16), out,
                                   boost=BoostConfig(epochs=1, seed=1), aggregator_epochs=3, progress=False,
                                   checkpoint_dir=ckpt, **kw)


def test_a_compile_stopped_after_calibration_resumes_without_calibrating_again(tmp_path, monkeypatch):
    from coformer.compiler import pipeline

    reference = _compile(tmp_path / "ref", None)
    real = pipeline.train_aggregator

    def stop(*a, **kw):  # Ctrl-C once both sub-models are calibrated
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "train_aggregator", stop)
    with pytest.raises(KeyboardInterrupt):
        _compile(tmp_path / "bundle", tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.pt")) == ["sub-0.pt", "sub-1.pt", "teacher.pt"]
    assert not (tmp_path / "bundle").exists()  # nothing half-written

    monkeypatch.setattr(pipeline, "train_aggregator", real)
    resumed = _compile(tmp_path / "bundle", tmp_path / "ckpt")
    assert resumed.boost.resumed == [0, 1]
    assert resumed.boost.losses == reference.boost.losses
    for a, b in zip(resumed.submodels, reference.submodels):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert resumed.accuracy == reference.accuracy
    assert not (tmp_path / "ckpt").exists()  # removed once the bundle is written
