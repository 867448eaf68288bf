"""TensorRT engines built on the device and cached beside the bundle's ONNX (issue 22, item 1).

A TensorRT engine belongs to one TensorRT version and one GPU, so a bundle carries ONNX
and each device builds its own engine from it. Everything here except :func:`build_engine`
is plain Python, so the cache's rules are tested without a GPU:

* **Where.** ``BUNDLE/engines/<device>.<model>.<trt-version>.<gpu>.plan``, with a sidecar
  ``.json`` (the ONNX's SHA-256 from the signed manifest, the engine's SHA-256, the build
  settings, the parity against ONNX Runtime) and one timing cache per TensorRT version and
  GPU (``<trt-version>.<gpu>.timing-cache``), shared by the device's models. ``<gpu>`` is the
  GPU's name with its compute capability (``nvidia-jetson-orin-nano-sm87``). The signed
  manifest is never rewritten: the sidecar is the engine's record.
* **When to rebuild** (:func:`rebuild_reason`): no engine, no sidecar, another ONNX (its
  SHA-256), an engine file that does not hash to its sidecar's, or other build settings.
* **Precision** (:func:`choose_precision`). TensorRT 10 (JetPack 6) takes ``fp16`` as a
  builder flag on the float32 ONNX. TensorRT 11 builds strongly typed networks only: the
  precision is the ONNX's own, so ``fp16`` needs an fp16 ONNX in the bundle. TensorRT
  before 10 is refused.
* **Shapes** (:func:`optimization_profile`). Batch 1 / 1 / the manifest's ``max_batch``;
  a text input's sequence axis 1 / its maximum / its maximum (choice written down: the
  optimum at the longest request, so no request runs off the tuned shape's end).

The build itself goes through NVIDIA's Polygraphy (``NetworkFromOnnxPath``,
``CreateConfig``, ``EngineBytesFromNetwork`` with the timing cache), imported only there.
Not yet run on a GPU: CI and the development machines have neither a GPU nor TensorRT.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Optional

from coformer.runtime.errors import CoFormerError
from coformer.runtime.files import atomic_write_bytes, atomic_write_json, read_json, sha256_file

ENGINE_DIR = "engines"
PRECISIONS = ("fp32", "fp16")
SIDECAR_VERSION = 1


def gpu_tag(name: str, compute_capability: tuple[int, int]) -> str:
    """``"NVIDIA Jetson Orin Nano", (8, 7)`` -> ``"nvidia-jetson-orin-nano-sm87"``."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-") or "gpu"
    major, minor = (int(v) for v in compute_capability)
    return f"{slug}-sm{major}{minor}"


def _version_tag(trt_version: str) -> str:
    if not re.fullmatch(r"\d+(\.\d+)*", str(trt_version)):
        raise CoFormerError(f"TensorRT version {trt_version!r} is not a version such as 10.3.0")
    return str(trt_version)


def engine_paths(bundle_dir: Path, device: str, model: str, trt_version: str, gpu: str) -> dict[str, Path]:
    """The engine, its sidecar and the timing cache of one model of ``device`` (module doc)."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*-sm\d+", gpu):
        raise CoFormerError(f"GPU tag {gpu!r} is not one gpu_tag makes (e.g. nvidia-jetson-orin-nano-sm87)")
    version = _version_tag(trt_version)
    stem = ".".join(p for p in (device, model or None, version, gpu) if p)
    folder = Path(bundle_dir) / ENGINE_DIR
    return {"plan": folder / f"{stem}.plan", "sidecar": folder / f"{stem}.json",
            "timing_cache": folder / f"{version}.{gpu}.timing-cache"}


def choose_precision(trt_version: str, precision: str, fp16_onnx: bool) -> dict[str, Any]:
    """How to build at ``precision`` with this TensorRT (module doc): ``strongly_typed``,
    the ``fp16`` builder flag, and which ONNX (``fp32`` or ``fp16``) to parse."""
    if precision not in PRECISIONS:
        raise CoFormerError(f"--precision {precision!r} is not one of {list(PRECISIONS)}")
    major = int(_version_tag(trt_version).split(".")[0])
    if major < 10:
        raise CoFormerError(f"TensorRT {trt_version}: CoFormer builds engines with TensorRT 10 or later "
                            "(JetPack 6 on a Jetson)")
    if major >= 11:
        if precision == "fp16" and not fp16_onnx:
            raise CoFormerError(f"TensorRT {trt_version} builds strongly typed networks only, whose precision is "
                                "the ONNX's: this bundle has no fp16 ONNX; build at --precision fp32, or compile an "
                                "fp16 ONNX into the bundle")
        return {"strongly_typed": True, "fp16_flag": False, "onnx": precision}
    return {"strongly_typed": False, "fp16_flag": precision == "fp16", "onnx": "fp32"}


def optimization_profile(manifest) -> dict[str, list[list[int]]]:
    """Input name -> ``[min, opt, max]`` shapes of the bundle's models (module doc)."""
    inp = manifest.input
    batch = int(inp.max_batch)
    if inp.is_text:
        T = int(inp.shape[-1])
        return {name: [[1, 1], [1, T], [batch, T]] for name in inp.preprocessing["fields"]}
    shape = [int(v) for v in inp.shape]
    for axis in inp.dynamic_axes:
        raise CoFormerError(f"input axis {axis} of an image bundle is dynamic; TensorRT profiles take text only")
    return {inp.name: [[1, *shape], [1, *shape], [batch, *shape]]}


def build_settings(trt_version: str, gpu: str, precision: str, choice: Mapping[str, Any],
                   profile: Mapping[str, Any]) -> dict[str, Any]:
    """What an engine was built with; a change in any of it means a rebuild."""
    return {"tensorrt": _version_tag(trt_version), "gpu": gpu, "precision": precision,
            "strongly_typed": bool(choice["strongly_typed"]), "fp16_flag": bool(choice["fp16_flag"]),
            "onnx_precision": choice["onnx"], "profile": {k: [list(s) for s in v] for k, v in profile.items()}}


def rebuild_reason(paths: Mapping[str, Path], onnx_sha256: str, settings: Mapping[str, Any]) -> Optional[str]:
    """Why the cached engine at ``paths`` cannot be used for this ONNX and these settings;
    None when it can."""
    plan, sidecar = Path(paths["plan"]), Path(paths["sidecar"])
    if not plan.is_file():
        return "no engine built yet"
    if not sidecar.is_file():
        return f"the engine has no sidecar ({sidecar.name})"
    try:
        record = read_json(sidecar, f"sidecar {sidecar} does not exist")
    except CoFormerError as e:
        return f"the sidecar cannot be read ({e})"
    if not isinstance(record, dict) or record.get("version") != SIDECAR_VERSION:
        return "the sidecar is from another version of CoFormer"
    if record.get("onnx_sha256") != onnx_sha256:
        return "the ONNX changed since the engine was built"
    if record.get("settings") != dict(settings):
        changed = sorted(k for k in set(settings) | set(record.get("settings") or {})
                         if (record.get("settings") or {}).get(k) != settings.get(k))
        return f"built with other settings ({', '.join(changed)})"
    if sha256_file(plan) != record.get("engine_sha256"):
        return "the engine file does not match its sidecar's SHA-256 (replaced or truncated)"
    return None


def write_sidecar(paths: Mapping[str, Path], onnx_file: str, onnx_sha256: str, settings: Mapping[str, Any],
                  parity: Optional[Mapping[str, Any]], build_s: float) -> dict[str, Any]:
    """Record the engine at ``paths['plan']`` (after it is written; atomically)."""
    record = {"version": SIDECAR_VERSION, "onnx": onnx_file, "onnx_sha256": onnx_sha256,
              "engine": Path(paths["plan"]).name, "engine_sha256": sha256_file(Path(paths["plan"])),
              "settings": dict(settings), "parity": dict(parity) if parity is not None else None,
              "build_s": float(build_s)}
    atomic_write_json(Path(paths["sidecar"]), record)
    return record


def build_engine(onnx_path: Path, paths: Mapping[str, Path], choice: Mapping[str, Any],
                 profile: Mapping[str, Any]) -> float:
    """Build one engine with Polygraphy and write it to ``paths['plan']`` atomically, with the
    timing cache loaded and saved; returns the build seconds. Needs TensorRT and Polygraphy."""
    import time

    try:
        from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
    except ImportError:
        raise CoFormerError("building TensorRT engines needs Polygraphy: pip install 'coformer[tensorrt]' "
                            "(and TensorRT: JetPack's python3-libnvinfer, or pip install tensorrt)") from None
    prof = Profile()
    for name, (lo, opt, hi) in profile.items():
        prof.add(name, min=tuple(lo), opt=tuple(opt), max=tuple(hi))
    cache = Path(paths["timing_cache"])
    cache.parent.mkdir(parents=True, exist_ok=True)
    config = CreateConfig(fp16=bool(choice["fp16_flag"]) or None, profiles=[prof],
                          load_timing_cache=str(cache) if cache.is_file() else None)
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=bool(choice["strongly_typed"]) or None)
    start = time.perf_counter()
    engine_bytes = EngineBytesFromNetwork(network, config=config, save_timing_cache=str(cache))()
    atomic_write_bytes(Path(paths["plan"]), bytes(engine_bytes))
    return time.perf_counter() - start


def cuda_device(index: int = 0) -> tuple[str, tuple[int, int]]:
    """The GPU's name and compute capability, from cuda-python (as TensorRT's samples use it)."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python 12.8 and later
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise CoFormerError("reading the GPU needs cuda-python: pip install 'coformer[tensorrt]'") from None
    err, prop = cudart.cudaGetDeviceProperties(index)
    if err != cudart.cudaError_t.cudaSuccess:
        raise CoFormerError(f"CUDA cannot read GPU {index}: {err}")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return name.rstrip("\x00"), (int(prop.major), int(prop.minor))


def build_engines(bundle_dir: Path, device: str, precision: str = "fp16") -> list[dict[str, Any]]:
    """``coformer-runtime build-engines``: build (or reuse, :func:`rebuild_reason`) the engine of
    every model ``device`` runs in the bundle, on this machine's TensorRT and first GPU.

    Not yet recorded: parity of the engine against ONNX Runtime (``parity: null`` in the
    sidecar), which needs the TensorRT runtime backend, not in this release.
    """
    import importlib

    from coformer.runtime.manifest import load_manifest

    try:
        trt = importlib.import_module("tensorrt")
    except ImportError:
        raise CoFormerError("building TensorRT engines needs TensorRT's Python bindings, which are not installed: "
                            "on a Jetson, JetPack's python3-libnvinfer; on x86, pip install tensorrt") from None
    version = str(trt.__version__)
    manifest = load_manifest(bundle_dir)  # checksums verified: the engine is built from the signed ONNX
    art = manifest.device(device)
    if art.models:
        raise CoFormerError(f"device {device!r} holds a baseline's models; engines are built for CoFormer and "
                            "teacher bundles, whose models take the bundle's input")
    gpu = gpu_tag(*cuda_device())
    profile = optimization_profile(manifest)
    out = []
    for model, rel in art.model_files().items():
        choice = choose_precision(version, precision, fp16_onnx=False)  # bundles carry float32 ONNX so far
        settings = build_settings(version, gpu, precision, choice, profile)
        paths = engine_paths(bundle_dir, device, model, version, gpu)
        reason = rebuild_reason(paths, manifest.files[rel], settings)
        if reason is None:
            out.append({"model": rel, "engine": str(paths["plan"]), "built": False})
            continue
        seconds = build_engine(Path(bundle_dir) / rel, paths, choice, profile)
        write_sidecar(paths, rel, manifest.files[rel], settings, None, seconds)
        out.append({"model": rel, "engine": str(paths["plan"]), "built": True, "reason": reason,
                    "build_s": seconds})
    return out
