"""ONNX Runtime's GPU providers, from CoFormer's side (no GPU here): how each machine is told to
get them, and a provider that loads but fails at its first run reaching the user as one line."""

import numpy as np
import pytest

from coformer.runtime.engines import gpu_onnxruntime_install
from coformer.runtime.errors import CoFormerError


def test_a_jetson_is_not_sent_to_a_wheel_pypi_does_not_have():
    jetson = gpu_onnxruntime_install("aarch64")
    assert "no onnxruntime-gpu" in jetson and "NVIDIA's Jetson build" in jetson and "coformer[gpu]" not in jetson
    assert "coformer[gpu]" in gpu_onnxruntime_install("x86_64")
    assert "pip uninstall onnxruntime" in jetson and "pip uninstall onnxruntime" in gpu_onnxruntime_install("x86_64")


def test_a_failure_at_the_first_bound_run_is_one_line_naming_the_provider_and_the_model(tmp_path):
    """The IOBinding path (the GPU providers' path) on the CPU device, fed a wrong shape: ONNX
    Runtime raises at run_with_iobinding, and the user gets one line, not its exception."""
    import torch

    from coformer.compiler.lower import export_onnx
    from coformer.runtime.onnxruntime_backend import OnnxRuntimeEngine

    path = tmp_path / "m.onnx"
    export_onnx(torch.nn.Linear(4, 2), [torch.zeros(1, 4)], path, ["x"], ["y"])
    with OnnxRuntimeEngine(path, bind_device="cpu") as engine:
        assert engine.infer({"x": np.ones((1, 4), np.float32)})["y"].shape == (1, 2)  # the bound path runs
        with pytest.raises(CoFormerError, match=r"ONNX Runtime's CPUExecutionProvider failed running .*m.onnx: ") as e:
            engine.infer({"x": np.ones((1, 7), np.float32)})
    assert "\n" not in str(e.value)
