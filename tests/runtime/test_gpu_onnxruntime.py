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


def test_onnxruntime_tensorrt_caches_its_engines_and_builds_at_the_precision_asked(tmp_path):
    """ONNX Runtime's TensorRT provider, by default, rebuilds every engine at every start, in
    fp32, and at every new shape: CoFormer gives it its caches, fp16 and, with shapes, a profile."""
    from coformer.runtime.engines import ORT_PROVIDERS, ORT_TRT_CACHE, ort_providers

    (name, opts), *rest = ort_providers("onnxruntime-tensorrt", tmp_path, "fp16",
                                       {"input_ids": (1, 32), "attention_mask": (1, 32)})
    assert name == "TensorrtExecutionProvider" and rest == ORT_PROVIDERS["onnxruntime-tensorrt"][1:]
    assert opts["trt_engine_cache_enable"] and opts["trt_timing_cache_enable"] and opts["trt_fp16_enable"]
    assert opts["trt_engine_cache_path"] == opts["trt_timing_cache_path"] == str(tmp_path / ORT_TRT_CACHE)
    assert opts["trt_profile_min_shapes"] == opts["trt_profile_max_shapes"] == "input_ids:1x32,attention_mask:1x32"
    (_, fp32), *_ = ort_providers("onnxruntime-tensorrt", tmp_path, "fp32")
    assert fp32["trt_fp16_enable"] is False and "trt_profile_min_shapes" not in fp32
    assert ort_providers("onnxruntime-cuda", tmp_path) == ORT_PROVIDERS["onnxruntime-cuda"]


def test_a_provider_given_with_options_is_loaded_and_checked_by_its_name(tmp_path):
    import torch

    from coformer.compiler.lower import export_onnx
    from coformer.runtime.onnxruntime_backend import OnnxRuntimeEngine

    path = tmp_path / "m.onnx"
    export_onnx(torch.nn.Linear(4, 2), [torch.zeros(1, 4)], path, ["x"], ["y"])
    with OnnxRuntimeEngine(path, providers=[("CPUExecutionProvider", {})]) as engine:
        assert engine.provider == "CPUExecutionProvider"
        assert engine.infer({"x": np.ones((1, 4), np.float32)})["y"].shape == (1, 2)
