"""``coformer-runtime doctor [BUNDLE]``: the one command to run first on a new device (issue 38).

One table of what this device has for serving a bundle, each line checked by using it, not by
reading a version string alone, and each line that fails saying what to install:

* ONNX Runtime: its version, and every provider it lists run on a tiny model (a provider can
  be listed and still fail at its first run: no CUDA libraries, a driver too old);
* TensorRT: its version and where the bindings were imported from (JetPack's system package or
  a pip wheel); Polygraphy (which builds the engines); trtexec on the PATH and its release;
* CUDA: the driver's and cuda-python's runtime versions and whether they fit
  (:func:`coformer.runtime.tensorrt_backend.driver_mismatch`); the GPU's name, SM version and
  multiprocessor count (what engine names carry);
* with a bundle: the backend the device would serve it on (TensorRT where all of the above
  work, ONNX Runtime's CUDA provider where that runs, else the CPU), the central device's model
  built for it (a TensorRT engine, with its parity against ONNX Runtime on the bundle's check
  inputs, as ``build-engines`` records it) and timed.

Nothing here needs a GPU to run: on a machine without one every GPU line says so.
"""

from __future__ import annotations

import base64
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from coformer.runtime.errors import CoFormerError, first_line

# A one-node ONNX model (Relu, x: float32 [1, 4] -> y), serialised: enough to open a session on
# each provider without the onnx package, which the device runtime does not install.
TINY_ONNX = base64.b64decode("CAg6QAoMCgF4EgF5IgRSZWx1EgZkb2N0b3JaEwoBeBIOCgwIARIICgIIAQoCCARiEwoBeRIOCgwIARIICgIIAQoC"
                             "CARCBAoAEA0=")
TENSORRT_INSTALL = "on a Jetson, JetPack's python3-libnvinfer (apt); on x86, pip install tensorrt"


@dataclass
class Check:
    """One line of the table: what, whether it works (``ok``, ``no``: absent, ``fail``: present
    but not working), what was found, and what to do where it does not work."""

    what: str
    status: str
    detail: str
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def onnxruntime_checks() -> list[Check]:
    """ONNX Runtime's version, then each provider it lists, run on :data:`TINY_ONNX`."""
    try:
        import onnxruntime as ort
    except ImportError:
        return [Check("onnxruntime", "no", "not installed", "pip install 'coformer[cpu]' (or ONNX Runtime with CUDA)")]
    out = [Check("onnxruntime", "ok", f"{ort.__version__} ({', '.join(ort.get_available_providers())})")]
    x = np.array([[-1.0, 0.0, 1.0, 2.0]], np.float32)
    for provider in ort.get_available_providers():
        try:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            session = ort.InferenceSession(TINY_ONNX, opts, providers=[provider])
            if provider not in session.get_providers():
                raise CoFormerError(f"fell back to {session.get_providers()}")
            y = session.run(None, {"x": x})[0]
            if not np.array_equal(y, np.maximum(x, 0)):
                raise CoFormerError(f"answered {y.tolist()} for Relu({x.tolist()})")
            out.append(Check(f"  {provider}", "ok", "runs a model"))
        except Exception as e:  # onnxruntime raises its own types; the line is the point
            from coformer.runtime.engines import gpu_onnxruntime_install

            out.append(Check(f"  {provider}", "fail", first_line(e)[:160], gpu_onnxruntime_install()))
    return out


def tensorrt_checks() -> list[Check]:
    """TensorRT's bindings, Polygraphy and trtexec."""
    out = []
    try:
        trt = importlib.import_module("tensorrt")
        out.append(Check("tensorrt", "ok", f"{trt.__version__} from {Path(trt.__file__).parent}"))
    except ImportError:
        out.append(Check("tensorrt", "no", "Python bindings not installed", TENSORRT_INSTALL))
    try:
        pg = importlib.import_module("polygraphy")
        out.append(Check("polygraphy", "ok", str(pg.__version__)))
    except ImportError:
        out.append(Check("polygraphy", "no", "not installed (builds TensorRT engines)",
                         "pip install 'coformer[tensorrt]'"))
    import shutil

    exe = shutil.which("trtexec")
    if exe is None:
        out.append(Check("trtexec", "no", "not on the PATH (only for profile --run-trtexec)",
                         "it comes with TensorRT: on a Jetson, add /usr/src/tensorrt/bin to PATH"))
    else:
        from coformer.runtime.trtexec import trtexec_version

        try:
            out.append(Check("trtexec", "ok", f"TensorRT {trtexec_version(exe)} at {exe}"))
        except CoFormerError as e:
            out.append(Check("trtexec", "fail", str(e)))
    return out


def cuda_checks() -> list[Check]:
    """cuda-python, the driver and runtime versions, and the GPU."""
    from coformer.runtime.tensorrt_backend import bindings_version, driver_mismatch

    try:
        try:
            from cuda.bindings import runtime as rt
        except ImportError:
            from cuda import cudart as rt
    except ImportError:
        return [Check("cuda-python", "no", "not installed (the tensorrt backend's CUDA calls)",
                      "pip install 'coformer[tensorrt]' (JetPack 6: 'cuda-python>=12,<13')"),
                Check("GPU", "no", "no GPU seen (cuda-python is missing)")]
    version = bindings_version()
    err, driver = rt.cudaDriverGetVersion()[:2]
    driver = int(driver) if err == rt.cudaError_t.cudaSuccess else 0
    err2, runtime = rt.cudaRuntimeGetVersion()[:2]
    runtime = int(runtime) if err2 == rt.cudaError_t.cudaSuccess else 0

    def cuda(v: int) -> str:
        return f"CUDA {v // 1000}.{(v % 1000) // 10}" if v else "none"

    bad = driver_mismatch(version, driver)
    out = [Check("cuda-python", "fail" if bad else "ok",
                 f"{version}; driver {cuda(driver)}, runtime {cuda(runtime)}", bad or "")]
    err, count = rt.cudaGetDeviceCount()[:2]
    if driver == 0 or err != rt.cudaError_t.cudaSuccess or int(count) == 0:
        out.append(Check("GPU", "no", "no GPU (no CUDA driver or no device)",
                         "a device with an NVIDIA GPU and its driver (JetPack on a Jetson)"))
        return out
    from coformer.runtime.tensorrt_engines import cuda_device, gpu_tag

    name, (major, minor), sms = cuda_device()
    out.append(Check("GPU", "ok", f"{name}, sm{major}{minor}, {sms} multiprocessors "
                                  f"(engines tagged {gpu_tag(name, (major, minor), sms)})"))
    return out


def choose_backend(checks: list[Check]) -> str:
    """The backend a bundle would be served on: TensorRT where its bindings, Polygraphy,
    cuda-python and a GPU all work; ONNX Runtime's CUDA provider where it runs; else the CPU."""
    ok = {c.what.strip() for c in checks if c.ok}
    if {"tensorrt", "polygraphy", "cuda-python", "GPU"} <= ok:
        return "tensorrt"
    if "CUDAExecutionProvider" in ok:
        return "onnxruntime-cuda"
    return "onnxruntime"


def bundle_checks(bundle: Path, backend: str) -> list[Check]:
    """The central device's model on ``backend``: built (TensorRT), its parity against ONNX
    Runtime on the CPU over the bundle's check inputs, and its median latency."""
    from coformer.runtime.engines import open_engine
    from coformer.runtime.manifest import load_manifest
    from coformer.runtime.tensorrt_engines import check_inputs
    from coformer.runtime.timing import benchmark_engine

    manifest = load_manifest(Path(bundle))  # every file's SHA-256 checked
    device = manifest.central
    path = Path(bundle) / device.artifact
    feeds, source = check_inputs(Path(bundle), manifest)
    out = [Check("bundle", "ok", f"{manifest.model.get('name', '?')}; {device.device}'s model {device.artifact}; "
                                 f"would serve on {backend}")]
    try:
        if backend == "tensorrt":
            from coformer.runtime.tensorrt_engines import build_engines

            record = build_engines(Path(bundle), device.device, "fp16")[0]
            parity = float(record["parity"]["max_abs_diff"])
            out.append(Check("  engine", "ok", f"{'built' if record['built'] else 'reused'} {record['engine']}"))
        else:
            with open_engine(path, "onnxruntime") as ref, open_engine(path, backend) as engine:
                want, got = ref.infer(feeds), engine.infer(feeds)
            parity = max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
        out.append(Check("  parity", "ok", f"max |difference| {parity:.2e} against ONNX Runtime on the CPU "
                                           f"({source})"))
        t = benchmark_engine(path, backend, warmup_ms=100, iterations=20, duration_s=0.5,
                             inputs={k: v[:1] for k, v in feeds.items()})
        out.append(Check("  timed", "ok", f"median {t.latency_ms['median']:.3f} ms, p90 {t.latency_ms['p90']:.3f} ms "
                                          f"over {t.iterations} runs at batch 1"))
    except CoFormerError as e:
        out.append(Check(f"  {backend}", "fail", str(e)))
    return out


def doctor(bundle: Optional[Path] = None) -> list[Check]:
    """Every check of the module doc, in table order."""
    checks = onnxruntime_checks() + tensorrt_checks() + cuda_checks()
    if bundle is not None:
        checks += bundle_checks(Path(bundle), choose_backend(checks))
    return checks


def format_table(checks: list[Check]) -> str:
    width = max(len(c.what) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.what:<{width}}  {c.status:<4}  {c.detail}")
        if c.fix and not c.ok:
            lines.append(f"{'':<{width}}        -> {c.fix}")
    return "\n".join(lines)


def to_dict(checks: list[Check]) -> list[dict[str, Any]]:
    return [{"what": c.what.strip(), "status": c.status, "detail": c.detail, "fix": c.fix} for c in checks]
