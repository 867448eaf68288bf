"""The TensorRT engine cache's rules, which need no GPU: where engines go, when they are rebuilt,
which precision each TensorRT version builds, the optimisation profiles. These check CoFormer's
own decisions, not TensorRT: nothing here builds or runs an engine."""

import json
from pathlib import Path

import pytest

from coformer.runtime.errors import CoFormerError
from coformer.runtime.manifest import InputSpec
from coformer.runtime.tensorrt_engines import (build_settings, choose_precision, engine_paths, gpu_tag,
                                               optimization_profile, rebuild_reason, write_sidecar)


def test_engine_names_carry_the_device_the_tensorrt_version_and_the_gpu(tmp_path):
    gpu = gpu_tag("NVIDIA Jetson Orin Nano (8GB)", (8, 7), 8)
    assert gpu == "nvidia-jetson-orin-nano-8gb-sm87-8sm"
    p = engine_paths(tmp_path, "edge-b", "", "10.3.0", gpu)
    assert p["plan"] == tmp_path / "engines" / "edge-b.10.3.0.nvidia-jetson-orin-nano-8gb-sm87-8sm.plan"
    assert p["sidecar"].name == "edge-b.10.3.0.nvidia-jetson-orin-nano-8gb-sm87-8sm.json"
    assert p["timing_cache"].name == "10.3.0.nvidia-jetson-orin-nano-8gb-sm87-8sm.timing-cache"
    # another TensorRT or another GPU is another engine; a baseline's models each get one
    assert engine_paths(tmp_path, "edge-b", "", "10.4.0", gpu)["plan"] != p["plan"]
    assert engine_paths(tmp_path, "edge-b", "", "10.3.0", gpu_tag("Orin", (8, 7), 8))["plan"] != p["plan"]
    # Jetson modules that report the same name and SM version: an AGX Orin (16 SMs) never
    # reuses an Orin Nano's (8 SMs) engine or timing cache
    nano, agx = (engine_paths(tmp_path, "edge-b", "", "10.3.0", gpu_tag("Orin", (8, 7), n)) for n in (8, 16))
    assert nano["plan"] != agx["plan"] and nano["timing_cache"] != agx["timing_cache"]
    with pytest.raises(CoFormerError, match="'orin-sm87' is not one gpu_tag makes"):
        engine_paths(tmp_path, "edge-b", "", "10.3.0", "orin-sm87")  # an old tag without the SM count
    assert engine_paths(tmp_path, "edge-b", "stage1", "10.3.0", gpu)["plan"].name.startswith("edge-b.stage1.")
    with pytest.raises(CoFormerError, match="'10.x'"):
        engine_paths(tmp_path, "edge-b", "", "10.x", gpu)


def test_each_tensorrt_version_gets_the_precision_it_can_build():
    assert choose_precision("10.3.0", "fp16", fp16_onnx=False) == {"strongly_typed": False, "fp16_flag": True,
                                                                   "onnx": "fp32"}
    assert choose_precision("10.3.0", "fp32", fp16_onnx=True)["fp16_flag"] is False
    # TensorRT 11 builds strongly typed networks only: fp16 comes from an fp16 ONNX, never a flag
    assert choose_precision("11.4.0", "fp16", fp16_onnx=True) == {"strongly_typed": True, "fp16_flag": False,
                                                                  "onnx": "fp16"}
    assert choose_precision("11.4.0", "fp32", fp16_onnx=False)["onnx"] == "fp32"
    with pytest.raises(CoFormerError, match="strongly typed.*no fp16 ONNX"):
        choose_precision("11.4.0", "fp16", fp16_onnx=False)
    with pytest.raises(CoFormerError, match="TensorRT 8.6.1.*10 or later.*JetPack 6.0 ships TensorRT 8.6: flash JetPack 6.1 or 6.2"):
        choose_precision("8.6.1", "fp32", fp16_onnx=False)
    with pytest.raises(CoFormerError, match="'int8'"):
        choose_precision("10.3.0", "int8", fp16_onnx=False)


def test_profiles_span_the_batch_and_a_text_bundles_lengths():
    image = type("M", (), {"input": InputSpec("pixels", "float32", (1, 16, 16), max_batch=8)})()
    assert optimization_profile(image) == {"pixels": [[1, 1, 16, 16], [1, 1, 16, 16], [8, 1, 16, 16]]}
    text = type("M", (), {"input": InputSpec("tokens", "int64", (2, 32), max_batch=4, dynamic_axes=(1,),
                                             preprocessing={"kind": "text",
                                                            "fields": ["input_ids", "attention_mask"]})})()
    assert optimization_profile(text) == {n: [[1, 1], [1, 32], [4, 32]] for n in ("input_ids", "attention_mask")}


def test_an_engine_is_rebuilt_exactly_when_something_it_was_built_from_changed(tmp_path):
    paths = engine_paths(tmp_path, "edge-a", "", "10.3.0", "orin-sm87-8sm")
    settings = build_settings("10.3.0", "orin-sm87-8sm", "fp16", choose_precision("10.3.0", "fp16", False),
                              {"pixels": [[1, 3], [1, 3], [8, 3]]})
    assert rebuild_reason(paths, "a" * 64, settings) == "no engine built yet"
    paths["plan"].parent.mkdir(parents=True)
    paths["plan"].write_bytes(b"engine bytes")
    assert "no sidecar" in rebuild_reason(paths, "a" * 64, settings)
    record = write_sidecar(paths, "edge-a.onnx", "a" * 64, settings, None, 1.5)
    assert json.loads(paths["sidecar"].read_text())["engine_sha256"] == record["engine_sha256"]
    assert rebuild_reason(paths, "a" * 64, settings) is None  # reused
    assert rebuild_reason(paths, "b" * 64, settings) == "the ONNX changed since the engine was built"
    fp32 = build_settings("10.3.0", "orin-sm87-8sm", "fp32", choose_precision("10.3.0", "fp32", False),
                          settings["profile"])
    assert rebuild_reason(paths, "a" * 64, fp32) == "built with other settings (fp16_flag, precision)"
    paths["plan"].write_bytes(b"engine bytes, truncat")
    assert "does not match its sidecar" in rebuild_reason(paths, "a" * 64, settings)
    paths["sidecar"].write_text("{not json")
    assert "cannot be read" in rebuild_reason(paths, "a" * 64, settings)


def test_engines_are_configured_as_trtexec_builds_them_tf32_on():
    """Polygraphy clears TF32 unless asked; trtexec keeps it (10.3, 11.0): asked, so fp32 engines
    and trtexec's timings are like for like."""
    pytest.importorskip("polygraphy", reason="pip install polygraphy (in the dev extra)")
    from coformer.runtime.tensorrt_engines import engine_config

    config = engine_config({"fp16_flag": False}, {"input": [[1, 3], [4, 3], [8, 3]]}, Path("/nonexistent/cache"))
    assert config.tf32 is True and not config.fp16 and config.timing_cache_path is None
    assert config.profiles[0]["input"].min == (1, 3) and config.profiles[0]["input"].max == (8, 3)
    assert engine_config({"fp16_flag": True}, {"input": [[1, 3]] * 3}, Path("/nonexistent")).fp16


def test_a_failed_parse_or_build_is_one_line_not_polygraphys_traceback(tmp_path):
    """Polygraphy raises PolygraphyException where TensorRT cannot parse or build (never None):
    the user gets one line naming the file. Here TensorRT itself is missing, which Polygraphy
    reports the same way, from the same call."""
    pytest.importorskip("polygraphy", reason="pip install polygraphy (in the dev extra)")
    from coformer.runtime.tensorrt_engines import build_engine

    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"not an onnx file")
    paths = {"plan": tmp_path / "e.plan", "timing_cache": tmp_path / "t.cache"}
    with pytest.raises(CoFormerError, match=r"TensorRT could not build an engine from .*corrupt.onnx: ") as e:
        build_engine(bad, paths, {"strongly_typed": False, "fp16_flag": False})
    assert "\n" not in str(e.value) and not paths["plan"].exists()


def test_an_engine_that_disagrees_with_onnx_runtime_is_refused_with_what_to_do():
    """The compile's fp16 gate runs on the CPU (weights rounded, arithmetic mostly float32): the
    engine's parity on the device is the real check, and past the tolerance it is not served."""
    from coformer.runtime.tensorrt_engines import PARITY_TOLERANCE, parity_refusal

    close = {"max_abs_diff": PARITY_TOLERANCE / 2, "inputs": "checks/inputs.npz"}
    assert parity_refusal(close, "fp16", "submodels/1-edge-b.onnx") is None
    assert parity_refusal({"max_abs_diff": None, "skipped": "onnxruntime is not installed"}, "fp16", "m") is None
    far = {"max_abs_diff": 0.4, "inputs": "checks/inputs.npz"}
    msg = parity_refusal(far, "fp16", "submodels/1-edge-b.onnx")
    assert "fp16 engine of submodels/1-edge-b.onnx differs from ONNX Runtime by 0.4" in msg
    assert "checks/inputs.npz" in msg and "--precision fp32" in msg
    assert "report it" in parity_refusal(far, "fp32", "m")
