"""The bundle manifest: the contract between the compiler and the device runtime.

A bundle is a folder holding ``manifest.json`` and the artifacts it lists. The
runtime reads the manifest, refuses a schema version it does not know, and
checks the SHA-256 of every artifact before it loads anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from coformer.runtime.files import MANIFEST_NAME, atomic_write_json, read_json, sha256_file
from coformer.runtime.errors import CoFormerError
from coformer.runtime.schema import (EMBEDDING_SCHEMA_VERSION, FLOAT16_FEATURES_SCHEMA_VERSION, READ_VERSIONS,
                                     SCHEMA_VERSION, TEXT_SCHEMA_VERSION)
from coformer.runtime.strategies import STRATEGIES, strategy_class
# What workers put on the wire for their pooled features: float32, or float16 at half the
# bytes (``coformer compile --feature-dtype float16``); the central node widens them to
# float32 before the aggregator, which was scored on features rounded the same way.
FEATURE_DTYPES = ("float32", "float16")
TASKS = ("classification", "embedding")
ROLES = ("central", "worker")
# How the central node drives the devices: the strategies of coformer.runtime.strategies
# (CoFormer's decomposition, PRISM's position-wise partitioning, the baselines of ``coformer
# bench``), all served by the same runtime.
DTYPES = ("float32", "int64", "int32")


def _need(d: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in d:
        raise CoFormerError(f"{where}: missing field '{key}'")
    value = d[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CoFormerError(f"{where}: field '{key}' is {value!r}, expected {kind.__name__}")
    return value


@dataclass(frozen=True)
class InputSpec:
    """One model input: the tensor every sub-model receives.

    ``shape`` is the per-sample shape, without the batch axis; ``max_batch`` caps
    the batch a server accepts. ``preprocessing`` says how raw data becomes this
    tensor (see :mod:`coformer.runtime.preprocess`, :mod:`coformer.runtime.text`).
    ``dynamic_axes`` lists per-sample axes whose length may be anything from 1
    to ``shape``'s (a text input's sequence axis).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    max_batch: int = 64
    preprocessing: Mapping[str, Any] = field(default_factory=dict)
    dynamic_axes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise CoFormerError(f"input dtype {self.dtype!r} is not one of {DTYPES}")
        if not self.shape or any(int(s) <= 0 for s in self.shape):
            raise CoFormerError(f"input shape {self.shape!r} must be non-empty and positive")
        if self.max_batch < 1:
            raise CoFormerError(f"input max_batch {self.max_batch} must be >= 1")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "dynamic_axes", tuple(int(a) for a in self.dynamic_axes))
        bad = [a for a in self.dynamic_axes if not 0 <= a < len(self.shape)]
        if bad:
            raise CoFormerError(f"input dynamic_axes {bad} are not axes of the per-sample shape {list(self.shape)}")

    @property
    def is_text(self) -> bool:
        return self.preprocessing.get("kind") == "text"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "InputSpec":
        w = "manifest input"
        return cls(
            name=_need(d, "name", str, w),
            dtype=_need(d, "dtype", str, w),
            shape=tuple(_need(d, "shape", list, w)),
            max_batch=_need(d, "max_batch", int, w),
            preprocessing=dict(d.get("preprocessing", {})),
            dynamic_axes=tuple(d.get("dynamic_axes", ())),
        )


@dataclass(frozen=True)
class ModelSpec:
    """One of a device's models in a baseline bundle: its file, input and output per sample."""

    artifact: str
    dtype: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> "ModelSpec":
        dtype = _need(d, "dtype", str, where)
        if dtype not in DTYPES:
            raise CoFormerError(f"{where}: dtype {dtype!r} is not one of {DTYPES}")
        return cls(_need(d, "artifact", str, where), dtype, tuple(_need(d, "input_shape", list, where)),
                   tuple(_need(d, "output_shape", list, where)))


@dataclass(frozen=True)
class DeviceArtifact:
    """Which device runs which sub-model, and what it sends to the central node.

    ``models`` (baseline bundles only) names every model the device holds, e.g.
    a pipeline stage or a tensor-parallel layer's share; a request names the
    one to run. A CoFormer device has one model, ``artifact``, fed the bundle's input.
    """

    device: str
    role: str
    artifact: str
    feature_dim: int
    flops: int
    params: int
    backend: str = "onnxruntime"
    threads: int = 1
    cpu_share: float = 1.0
    models: Mapping[str, ModelSpec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise CoFormerError(f"device {self.device!r}: role {self.role!r} is not one of {ROLES}")
        if self.feature_dim < 1:
            raise CoFormerError(f"device {self.device!r}: feature_dim {self.feature_dim} must be >= 1")
        if not 0.0 < self.cpu_share <= 1.0:
            raise CoFormerError(f"device {self.device!r}: cpu_share {self.cpu_share} must be in (0, 1]")

    def model_files(self) -> dict[str, str]:
        """Model name -> artifact for every model the device loads (``""``: a CoFormer device's one)."""
        return {name: m.artifact for name, m in self.models.items()} or {"": self.artifact}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DeviceArtifact":
        w = f"manifest device {d.get('device', '?')!r}"
        return cls(
            device=_need(d, "device", str, w),
            role=_need(d, "role", str, w),
            artifact=_need(d, "artifact", str, w),
            feature_dim=_need(d, "feature_dim", int, w),
            flops=_need(d, "flops", int, w),
            params=_need(d, "params", int, w),
            backend=d.get("backend", "onnxruntime"),
            threads=int(d.get("threads", 1)),
            cpu_share=float(d.get("cpu_share", 1.0)),
            models={k: ModelSpec.from_dict(v, f"{w} model {k!r}") for k, v in d.get("models", {}).items()},
        )


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to serve a bundle.

    ``devices`` is ordered: the aggregator's inputs ``feature_0..feature_{N-1}``
    follow this order. Exactly one device has the role ``central``.
    """

    model: Mapping[str, Any]
    task: Mapping[str, Any]
    input: InputSpec
    devices: tuple[DeviceArtifact, ...]
    aggregator: str
    files: Mapping[str, str]
    # Degraded answers: {"missing": [worker names], "aggregator": rel path, "score": test accuracy
    # (or mean cosine for an embedding bundle) with those devices missing}. Optional: older
    # bundles have none and are served all-or-nothing.
    fallbacks: tuple = ()
    parity: Mapping[str, float] = field(default_factory=dict)
    expected: Mapping[str, Any] = field(default_factory=dict)
    policy: Mapping[str, Any] = field(default_factory=dict)
    strategy: str = "coformer"
    feature_dtype: str = "float32"
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise CoFormerError(f"manifest strategy {self.strategy!r} is not one of {tuple(STRATEGIES)}")
        strategy = strategy_class(self.strategy)
        if self.feature_dtype not in FEATURE_DTYPES:
            raise CoFormerError(f"manifest feature_dtype {self.feature_dtype!r} is not one of {FEATURE_DTYPES}")
        kind = self.task.get("kind", "classification")
        if kind not in TASKS:
            raise CoFormerError(f"manifest task kind {kind!r} is not one of {TASKS}")
        if kind == "embedding":
            dim = self.task.get("dim")
            if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
                raise CoFormerError(f"an embedding bundle's task needs its 'dim', found {dim!r}")
        # the version is the newest feature's: each assignment below is a later version than the
        # last, and the strategy's own is the floor (PRISM's is the newest of all)
        object.__setattr__(self, "schema_version", max(self.schema_version, strategy.schema_version))
        if self.input.is_text or self.input.dynamic_axes:
            object.__setattr__(self, "schema_version", TEXT_SCHEMA_VERSION)
            if self.input.preprocessing.get("tokenizer") not in self.files:
                raise CoFormerError("a text bundle must carry its tokenizer with a checksum in 'files'")
        if kind == "embedding":
            object.__setattr__(self, "schema_version", EMBEDDING_SCHEMA_VERSION)
        if self.feature_dtype != "float32":
            object.__setattr__(self, "schema_version", FLOAT16_FEATURES_SCHEMA_VERSION)
        object.__setattr__(self, "schema_version", max(self.schema_version, strategy.schema_version))
        names = [d.device for d in self.devices]
        if len(set(names)) != len(names):
            raise CoFormerError(f"manifest devices {names} repeat a name")
        centrals = [d.device for d in self.devices if d.role == "central"]
        if len(centrals) != 1:
            raise CoFormerError(f"manifest needs exactly one central device, found {centrals}")
        needed = [d.artifact for d in self.devices] + [m.artifact for d in self.devices for m in d.models.values()]
        if strategy.fuses or self.aggregator:
            needed.append(self.aggregator)
        workers = {d.device for d in self.devices if d.role == "worker"}
        for fb in self.fallbacks:
            if (not isinstance(fb, Mapping) or not isinstance(fb.get("missing"), list) or not fb["missing"]
                    or not set(fb["missing"]) <= workers or not isinstance(fb.get("aggregator"), str)):
                raise CoFormerError(f"manifest fallback {fb!r} must name missing workers of this bundle and "
                                    "its aggregator file")
            needed.append(fb["aggregator"])
        object.__setattr__(self, "fallbacks", tuple(self.fallbacks))
        for rel in needed:
            if rel not in self.files:
                raise CoFormerError(f"manifest artifact {rel!r} has no checksum in 'files'")
        object.__setattr__(self, "devices", tuple(self.devices))

    @property
    def central(self) -> DeviceArtifact:
        return next(d for d in self.devices if d.role == "central")

    @property
    def workers(self) -> tuple[DeviceArtifact, ...]:
        return tuple(d for d in self.devices if d.role == "worker")

    @property
    def labels(self) -> list[str]:
        return list(self.task.get("labels", []))

    @property
    def task_kind(self) -> str:
        """``classification`` (the answer is logits over ``labels``) or ``embedding`` (a vector of
        ``task["dim"]`` numbers, unit length when ``task["normalize"]``)."""
        return str(self.task.get("kind", "classification"))

    def fallback(self, missing) -> Optional[Mapping[str, Any]]:
        """The fallback aggregator record for this set of missing workers, or None."""
        want = set(missing)
        return next((fb for fb in self.fallbacks if set(fb["missing"]) == want), None)

    def device(self, name: str) -> DeviceArtifact:
        for d in self.devices:
            if d.device == name:
                return d
        raise CoFormerError(
            f"device {name!r} is not in this bundle; it has {[d.device for d in self.devices]}"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input"]["shape"] = list(self.input.shape)
        d["input"]["dynamic_axes"] = list(self.input.dynamic_axes)
        for dev in d["devices"]:
            if not dev["models"]:
                del dev["models"]
            for m in dev.get("models", {}).values():
                m["input_shape"], m["output_shape"] = list(m["input_shape"]), list(m["output_shape"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Manifest":
        version = d.get("schema_version")
        if version not in READ_VERSIONS:
            raise CoFormerError(
                f"bundle schema_version {version!r} is not understood by this runtime "
                f"(it reads versions {list(READ_VERSIONS)}); rebuild the bundle with a matching coformer"
            )
        w = "manifest"
        return cls(
            model=_need(d, "model", dict, w),
            task=_need(d, "task", dict, w),
            input=InputSpec.from_dict(_need(d, "input", dict, w)),
            devices=tuple(DeviceArtifact.from_dict(x) for x in _need(d, "devices", list, w)),
            aggregator=_need(d, "aggregator", str, w),
            files=_need(d, "files", dict, w),
            fallbacks=tuple(_need(d, "fallbacks", list, w)) if "fallbacks" in d else (),
            parity=d.get("parity", {}),
            expected=d.get("expected", {}),
            policy=d.get("policy", {}),
            strategy=d.get("strategy", "coformer"),
            feature_dtype=d.get("feature_dtype", "float32"),
            schema_version=version,
        )


def write_manifest(bundle_dir: Path, manifest: Manifest) -> Path:
    path = Path(bundle_dir) / MANIFEST_NAME
    atomic_write_json(path, manifest.to_dict())
    return path


def manifest_digest(bundle_dir: Path) -> str:
    """SHA-256 of ``manifest.json``: peers compare it to know they serve the same bundle."""
    return sha256_file(Path(bundle_dir) / MANIFEST_NAME)


def load_manifest(bundle_dir: Path, verify: bool = True, trust: Optional[bytes] = None) -> Manifest:
    """Read a bundle's manifest; with ``verify``, check every listed file's SHA-256; with
    ``trust`` (the operator's Ed25519 verify key), first check ``manifest.sig``, so an edited
    manifest, or a file replaced together with its checksum, is refused
    (:func:`coformer.runtime.security.verify_signature`).

    Raises :class:`CoFormerError` naming the file for a missing manifest, a
    schema version this runtime does not read, a missing artifact or a checksum
    mismatch (a tampered or truncated copy).
    """
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    raw = read_json(path, f"{bundle_dir} is not a CoFormer bundle: no {MANIFEST_NAME} in it")
    if trust is not None:
        from coformer.runtime.security import verify_signature

        verify_signature(bundle_dir, trust)
    if not isinstance(raw, dict):
        raise CoFormerError(f"{path} must hold a JSON object, found {type(raw).__name__}")
    manifest = Manifest.from_dict(raw)
    if verify:
        for rel, expected in manifest.files.items():
            f = bundle_dir / rel
            if not f.is_file():
                raise CoFormerError(f"bundle {bundle_dir}: artifact {rel} is missing")
            actual = sha256_file(f)
            if actual != expected:
                raise CoFormerError(
                    f"bundle {bundle_dir}: artifact {rel} has SHA-256 {actual[:16]}..., "
                    f"the manifest says {expected[:16]}...; the file was changed or truncated, "
                    "copy the bundle again"
                )
    return manifest
