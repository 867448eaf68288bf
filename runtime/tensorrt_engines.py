"""TensorRT engines built on the device and cached beside the bundle's ONNX (issue 22, item 1).

A TensorRT engine belongs to one TensorRT version and one GPU, so a bundle carries ONNX
and each device builds its own engine from it. Everything here except :func:`build_engine`
is plain Python, so the cache's rules are tested without a GPU:

* **Where.** ``BUNDLE/engines/<device>.<model>.<trt-version>.<gpu>.plan``, with a sidecar
  ``.json`` (the ONNX's SHA-256 from the signed manifest, the engine's SHA-256, the build
  settings, the parity against ONNX Runtime) and one timing cache per TensorRT version and
  GPU (``<trt-version>.<gpu>.timing-cache``), shared by the device's models. ``<gpu>`` is the
  GPU's name with its compute capability and multiprocessor count (``orin-sm87-8sm``, see
  :func:`gpu_tag`). The signed
  manifest is never rewritten: the sidecar is the engine's record.
* **When to rebuild** (:func:`rebuild_reason`): no engine, no sidecar, another ONNX (its
  SHA-256), an engine file that does not hash to its sidecar's, or other build settings.
* **Precision** (:func:`choose_precision`). TensorRT 10 (JetPack 6.1 and 6.2 ship 10.3;
  JetPack 6.0 ships 8.6, which is refused) takes ``fp16`` as a
  builder flag on the float32 ONNX. TensorRT 11 builds strongly typed networks only: the
  precision is the ONNX's own, so ``fp16`` needs an fp16 ONNX in the bundle. TensorRT
  before 10 is refused.
* **Shapes** (:func:`optimization_profile`). Batch 1 / 1 / the manifest's ``max_batch``;
  a text input's sequence axis 1 / its maximum / its maximum (choice written down: the
  optimum at the longest request, so no request runs off the tuned shape's end).

* **Parity** (:func:`measure_parity`): a new engine is run on the bundle's check inputs
  (:func:`check_inputs`) beside ONNX Runtime on the CPU, and the largest absolute
  difference goes into the sidecar, as ``coformer compile`` records the ONNX's against
  PyTorch in the manifest; an engine past :data:`PARITY_TOLERANCE` is refused
  (:func:`parity_refusal`).

The build itself goes through NVIDIA's Polygraphy (``NetworkFromOnnxPath``,
``CreateConfig``, ``EngineBytesFromNetwork`` with the timing cache), imported only there.
Not yet run on a GPU: CI and the development machines have neither a GPU nor TensorRT.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Optional

from coformer.runtime.errors import CoFormerError, first_line
from coformer.runtime.files import atomic_write_bytes, atomic_write_json, read_json, sha256_file

ENGINE_DIR = "engines"
CHECK_INPUTS = "checks/inputs.npz"  # a few validation inputs, written by coformer compile
PRECISIONS = ("fp32", "fp16")
SIDECAR_VERSION = 1


def gpu_tag(name: str, compute_capability: tuple[int, int], multiprocessors: int) -> str:
    """``"Orin", (8, 7), 8`` -> ``"orin-sm87-8sm"``. The multiprocessor count is in the tag because
    Jetson modules report one device name for different GPUs (an AGX Orin and an Orin Nano both
    say "Orin", sm87, with 16 and 8 SMs): engines and timing caches tuned on one must never be
    reused on the other."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-") or "gpu"
    major, minor = (int(v) for v in compute_capability)
    if int(multiprocessors) < 1:
        raise CoFormerError(f"a GPU has at least one multiprocessor, got {multiprocessors}")
    return f"{slug}-sm{major}{minor}-{int(multiprocessors)}sm"


def _version_tag(trt_version: str) -> str:
    if not re.fullmatch(r"\d+(\.\d+)*", str(trt_version)):
        raise CoFormerError(f"TensorRT version {trt_version!r} is not a version such as 10.3.0")
    return str(trt_version)


def engine_paths(bundle_dir: Path, device: str, model: str, trt_version: str, gpu: str) -> dict[str, Path]:
    """The engine, its sidecar and the timing cache of one model of ``device`` (module doc)."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*-sm\d+-\d+sm", gpu):
        raise CoFormerError(f"GPU tag {gpu!r} is not one gpu_tag makes (e.g. orin-sm87-8sm)")
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
        raise CoFormerError(f"TensorRT {trt_version}: CoFormer builds engines with TensorRT 10 or later; on a "
                            "Jetson, JetPack 6.0 ships TensorRT 8.6: flash JetPack 6.1 or 6.2 (TensorRT 10.3)")
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
                 profile: Optional[Mapping[str, Any]] = None,
                 shapes: Optional[Mapping[str, Any]] = None, batch: int = 1) -> float:
    """Build one engine with Polygraphy and write it to ``paths['plan']`` atomically, with the
    timing cache loaded and saved; returns the build seconds.

    ``profile`` (input name -> min/opt/max) is a bundle's (:func:`optimization_profile`);
    without it, every input's profile is its shape in ``shapes``, or the ONNX's own shape
    filled as the benchmark fills it (:func:`coformer.runtime.stats.lone_shape`: a dynamic
    first axis at ``batch``, any other at 1; a lone ONNX: a profile kit's entry, a benchmark).
    Needs TensorRT and Polygraphy."""
    import time

    try:
        from polygraphy.backend.trt import EngineBytesFromNetwork, NetworkFromOnnxPath
    except ImportError:
        raise CoFormerError("building TensorRT engines needs Polygraphy: pip install 'coformer[tensorrt]' "
                            "(and TensorRT: JetPack's python3-libnvinfer, or pip install tensorrt)") from None
    from polygraphy.exception import PolygraphyException

    from coformer.runtime.stats import lone_shape

    start = time.perf_counter()
    cache = Path(paths["timing_cache"])
    try:
        # parsed once here, so a lone ONNX's profile can be read off the network's inputs
        network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=bool(choice["strongly_typed"]) or None)()
        if profile is None:
            net = network[1]
            profile = {}
            for i in range(net.num_inputs):
                tensor = net.get_input(i)
                own = lone_shape([None if int(d) < 0 else max(1, int(d)) for d in tensor.shape], batch)
                shape = [int(d) for d in (shapes or {}).get(tensor.name, own)]
                profile[tensor.name] = [shape, shape, shape]
        cache.parent.mkdir(parents=True, exist_ok=True)
        # Polygraphy raises PolygraphyException (G_LOGGER.critical) where the parse or the build
        # fails, and never returns None: the user gets its reason in one line, not a traceback
        engine_bytes = EngineBytesFromNetwork(network, config=engine_config(choice, profile, cache),
                                              save_timing_cache=str(cache))()
    except PolygraphyException as e:
        raise CoFormerError(f"TensorRT could not build an engine from {onnx_path}: {first_line(e)}") from None
    atomic_write_bytes(Path(paths["plan"]), bytes(engine_bytes))
    return time.perf_counter() - start


def engine_config(choice: Mapping[str, Any], profile: Mapping[str, Any], cache: Path):
    """Polygraphy's ``CreateConfig`` for an engine: ``choice``'s fp16 flag, one optimisation
    profile (input name -> min/opt/max), the timing cache where there is one, and TF32 on.
    Polygraphy turns TF32 off unless asked (``CreateConfig(tf32=None)`` clears the flag), where
    trtexec leaves it on (``--noTF32`` clears it, ``sampleEngines.cpp`` in 10.3 and 11.0): asked,
    so an fp32 engine is built as trtexec builds it and the two timings are like for like."""
    from polygraphy.backend.trt import CreateConfig, Profile

    prof = Profile()
    for name, (lo, opt, hi) in profile.items():
        prof.add(name, min=tuple(lo), opt=tuple(opt), max=tuple(hi))
    return CreateConfig(fp16=bool(choice["fp16_flag"]) or None, tf32=True, profiles=[prof],
                        load_timing_cache=str(cache) if Path(cache).is_file() else None)


def cuda_device(index: int = 0) -> tuple[str, tuple[int, int], int]:
    """The GPU's name, compute capability and multiprocessor count (``cudaDeviceProp``), from
    cuda-python (as TensorRT's samples use it)."""
    from coformer.runtime.tensorrt_backend import cuda_call, cudart

    rt = cudart()
    prop = cuda_call(rt, rt.cudaGetDeviceProperties(index))
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return name.rstrip("\x00"), (int(prop.major), int(prop.minor)), int(prop.multiProcessorCount)


def fp16_name(rel: str) -> str:
    """Where a bundle keeps a model's fp16 ONNX (``coformer compile --precision fp16``):
    ``submodels/0-edge-a.onnx`` -> ``submodels/0-edge-a.fp16.onnx``."""
    if not rel.endswith(".onnx"):
        raise CoFormerError(f"model file {rel!r} is not an .onnx file")
    return rel[:-len(".onnx")] + ".fp16.onnx"


def check_inputs(bundle_dir: Path, manifest, count: int = 3) -> tuple[dict[str, Any], str]:
    """Inputs to check an engine against ONNX Runtime with, and where they came from: the
    bundle's own (``CHECK_INPUTS``, which ``coformer compile`` writes from the validation
    split) or, in a bundle without them, ``count`` seeded ones made from the manifest's
    input (normal pixels; token ids across the vocabulary, a full mask, zero types)."""
    import numpy as np

    if CHECK_INPUTS in manifest.files:
        with np.load(Path(bundle_dir) / CHECK_INPUTS) as z:
            return {k: z[k] for k in z.files}, CHECK_INPUTS
    inp, rng = manifest.input, np.random.default_rng(0)
    if not inp.is_text:
        return {inp.name: rng.standard_normal((count, *inp.shape)).astype(np.float32)}, "seeded"
    T, pre = int(inp.shape[-1]), inp.preprocessing
    feeds = {}
    for field in pre["fields"]:
        if field == "input_ids":
            feeds[field] = rng.integers(4, max(5, int(pre.get("vocab_size", 100))), size=(count, T)).astype(np.int64)
        else:
            feeds[field] = (np.ones if field == "attention_mask" else np.zeros)((count, T), dtype=np.int64)
    return feeds, "seeded"


def measure_parity(plan: Path, onnx_path: Path, feeds: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The engine's largest absolute difference from ONNX Runtime on the CPU over ``feeds``
    (one sample at a time, as served), or why it could not be measured."""
    import importlib.util

    import numpy as np

    from coformer.runtime.onnxruntime_backend import OnnxRuntimeEngine
    from coformer.runtime.tensorrt_backend import TensorRTEngine

    if importlib.util.find_spec("onnxruntime") is None:  # onnxruntime-gpu carries the CPU provider too
        return {"max_abs_diff": None, "skipped": "onnxruntime is not installed", "inputs": source}
    n = min(len(v) for v in feeds.values())
    worst = 0.0
    with OnnxRuntimeEngine(onnx_path) as ref, TensorRTEngine(plan) as trt:
        for i in range(n):
            one = {k: np.ascontiguousarray(v[i:i + 1]) for k, v in feeds.items()}
            want, got = ref.infer(one), trt.infer(one)
            for name, value in want.items():
                worst = max(worst, float(np.max(np.abs(got[name].astype(np.float64) - value))))
    return {"max_abs_diff": worst, "inputs": source, "samples": n, "reference": "onnxruntime-cpu"}


def build_engines(bundle_dir: Path, device: str, precision: str = "fp16") -> list[dict[str, Any]]:
    """``coformer-runtime build-engines``: build (or reuse, :func:`rebuild_reason`) the engine of
    every model ``device`` runs in the bundle, on this machine's TensorRT and first GPU, and
    record each new engine's parity against ONNX Runtime on the CPU on the bundle's check
    inputs (:func:`check_inputs`, :func:`measure_parity`) in its sidecar.

    At ``fp16``, TensorRT 11 parses the model's fp16 ONNX (:func:`fp16_name`) where the
    bundle has one, and TensorRT 10 sets the fp16 builder flag on the float32 ONNX.
    """
    from coformer.runtime.manifest import load_manifest
    from coformer.runtime.tensorrt_backend import import_tensorrt

    trt = import_tensorrt()
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
        has_fp16 = fp16_name(rel) in manifest.files
        choice = choose_precision(version, precision, fp16_onnx=has_fp16)
        settings = build_settings(version, gpu, precision, choice, profile)
        paths = engine_paths(bundle_dir, device, model, version, gpu)
        reason = rebuild_reason(paths, manifest.files[rel], settings)
        if reason is None:
            out.append({"model": rel, "engine": str(paths["plan"]), "built": False,
                        "parity": read_json(paths["sidecar"], "")["parity"]})
            continue
        source = fp16_name(rel) if choice["onnx"] == "fp16" else rel
        seconds = build_engine(Path(bundle_dir) / source, paths, choice, profile)
        feeds, where = check_inputs(bundle_dir, manifest)
        parity = measure_parity(paths["plan"], Path(bundle_dir) / rel, feeds, where)
        refused = parity_refusal(parity, precision, rel)
        if refused:  # never served: removed, so the next start builds again (at the precision advised)
            paths["plan"].unlink(missing_ok=True)
            raise CoFormerError(refused)
        write_sidecar(paths, rel, manifest.files[rel], settings, parity, seconds)
        out.append({"model": rel, "engine": str(paths["plan"]), "built": True, "reason": reason,
                    "build_s": seconds, "parity": parity})
    return out


# The largest difference from ONNX Runtime on the CPU a built engine may show on the bundle's check
# inputs: a sub-model's pooled feature is O(1), fp16 keeps about 3 significant digits and TF32 (on,
# as trtexec builds) 10 mantissa bits; the compile's fp16 gate allows the same (compiler/lower.py).
PARITY_TOLERANCE = 5e-2


def parity_refusal(parity: Mapping[str, Any], precision: str, model: str) -> Optional[str]:
    """Why a freshly built engine must not be served, or None. The compile's fp16 gate runs on
    ONNX Runtime's CPU provider, which computes most fp16 nodes in float32, so it measures the
    weights' rounding, not fp16 arithmetic; the engine's own parity, on the device, is the real
    check, and an engine past :data:`PARITY_TOLERANCE` is refused (issue 38)."""
    diff = parity.get("max_abs_diff")
    if diff is None or diff <= PARITY_TOLERANCE:
        return None
    advice = ("build at --precision fp32" if precision == "fp16"
              else "this TensorRT computes the model differently from ONNX Runtime: report it, with the sidecar")
    return (f"the {precision} engine of {model} differs from ONNX Runtime by {diff:.3g} > {PARITY_TOLERANCE:g} on "
            f"{parity.get('inputs')}; it is not served: {advice}")


def engine_for_onnx(onnx_path: Path, precision: str = "fp16", shapes: Optional[Mapping[str, Any]] = None,
                    batch: int = 1) -> dict[str, Any]:
    """The engine of a lone ONNX file (a profile kit's entry, a file given to ``benchmark``),
    built beside it in ``engines/`` at ``precision`` when none matches, as a bundle's are;
    ``shapes`` and ``batch`` fix its dynamic axes (:func:`build_engine`). No parity here: a lone file
    has no reference inputs but the caller's."""
    from coformer.runtime.tensorrt_backend import import_tensorrt

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise CoFormerError(f"ONNX model {onnx_path} does not exist")
    version = str(import_tensorrt().__version__)
    gpu = gpu_tag(*cuda_device())
    # a lone file is parsed as it is: on TensorRT 11 its own types are the engine's
    choice = choose_precision(version, precision, fp16_onnx=onnx_path.name.endswith(".fp16.onnx"))
    requested = {k: [[int(d) for d in v]] * 3 for k, v in (shapes or {}).items()}
    requested["*batch"] = [[int(batch)]] * 3
    settings = build_settings(version, gpu, precision, choice, requested)
    paths = engine_paths(onnx_path.parent, onnx_path.stem, "", version, gpu)
    digest = sha256_file(onnx_path)
    reason = rebuild_reason(paths, digest, settings)
    if reason is not None:
        seconds = build_engine(onnx_path, paths, choice, None, shapes, batch)
        write_sidecar(paths, onnx_path.name, digest, settings, None, seconds)
    return {"engine": str(paths["plan"]), "built": reason is not None, "reason": reason}
