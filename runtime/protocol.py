"""Wire format between clients, the central node and workers (version 1).

Every message is a ZeroMQ multipart message of two frames:

* frame 0, the header: UTF-8 JSON object, at most ``MAX_HEADER_BYTES``, with
  ``v`` (protocol version), ``op`` (what the message is), ``id`` (request id,
  echoed in the reply) and, when a tensor follows, ``dtype`` and ``shape``;
* frame 1, the payload: the tensor's raw C-order bytes (empty when none), or, for an
  ``infer`` whose header lists ``images`` (each one's length) instead of a dtype and shape,
  encoded image files end to end: the central node forwards them as they came, and every
  device decodes and preprocesses them itself (a 224x224 JPEG is tens of KB; its float32
  pixels are 602 KB).

Ops: ``infer`` (client -> central -> workers: model input), ``features``
(worker -> central: pooled X_n), ``result`` (central -> client: logits),
``status`` / ``status_reply``, ``hello`` / ``welcome`` (worker registration)
and ``error`` (any reply: ``code`` and ``message``). A peer that receives a bad
message answers with an ``error`` and keeps serving; it never crashes on input.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from coformer.runtime.errors import CoFormerError

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 4096
MAX_HEADER_DEPTH = 8  # headers are shallow: an object of scalars, short lists and small objects
MAX_DIMS = 8  # a tensor's rank on the wire
MAX_DIM = 1 << 31  # one axis's length; the product is then checked against the payload in Python ints
OPS = ("infer", "features", "result", "status", "status_reply", "hello", "welcome", "error")
_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


class ProtocolError(CoFormerError):
    """A message that breaks the wire format or the bundle's input contract."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Message:
    """A decoded message: its header, and its payload as a tensor or as encoded images
    (``images``: each file's bytes, the header's ``images`` listing their lengths)."""

    header: Mapping[str, Any]
    tensor: Optional[np.ndarray] = None
    wire_bytes: int = 0
    images: Optional[tuple[bytes, ...]] = None

    @property
    def op(self) -> str:
        return str(self.header["op"])

    @property
    def id(self) -> int:
        return int(self.header.get("id", 0))


@dataclass(frozen=True)
class TensorLimits:
    """What a receiver accepts as a tensor: dtype, per-sample shape, batch cap.

    ``dynamic`` lists per-sample axes that may be shorter than ``shape`` says
    (1 up to it): a text input's sequence axis.
    """

    dtype: str
    shape: tuple[int, ...]
    max_batch: int = 64
    extra: Mapping[str, Any] = field(default_factory=dict)
    dynamic: tuple[int, ...] = ()

    @functools.cached_property  # asked of every message received: computed once (a frozen dataclass keeps a __dict__)
    def max_payload_bytes(self) -> int:
        return self.max_batch * math.prod(self.shape) * np.dtype(_DTYPES[self.dtype]).itemsize


def encode(op: str, request_id: int, tensor: Optional[np.ndarray] = None, *,
           images: Optional[Sequence[bytes]] = None, **fields: Any) -> list[bytes]:
    """Build the two frames of a message; ``fields`` go into the header.

    ``images`` (instead of ``tensor``): encoded image files (JPEG, PNG, WebP), one per
    sample, sent as they are: the payload is their bytes end to end and the header's
    ``images`` lists each one's length. A device decodes and preprocesses them as the
    manifest's ``input.preprocessing`` says (:mod:`coformer.runtime.images`)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "op": op, "id": int(request_id), **fields}
    payload = b""
    if images is not None:
        if tensor is not None:
            raise ValueError("a message carries a tensor or images, not both")
        header["images"] = [len(b) for b in images]
        return [json.dumps(header, separators=(",", ":")).encode(), b"".join(images)]
    if tensor is not None:
        arr = np.ascontiguousarray(tensor)
        name = str(arr.dtype)
        if name not in _DTYPES:
            raise ValueError(f"dtype {name} cannot go on the wire; use one of {sorted(_DTYPES)}")
        header["dtype"] = name
        header["shape"] = list(arr.shape)
        payload = arr.tobytes()
    return [json.dumps(header, separators=(",", ":")).encode(), payload]


@functools.lru_cache(maxsize=256)  # the search asks once per device and policy
def features_header_bytes(device: str, feature_dim: int, batch: int = 1) -> int:
    """The bytes of a worker's ``features`` header as :mod:`coformer.runtime.worker` writes it,
    for a device name and feature width (timings at full float precision, a large id), so
    that the compiler's latency model charges the wire what the runtime sends."""
    t = 0.00012345678901234567  # the longest repr a float gets in JSON: 22 characters
    frames = encode("features", 2**31 - 1, np.zeros((batch, feature_dim), np.float32), device=device,
                    compute_ms=t, queued_ms=t, service_ms=t)
    return len(frames[0])


def error_frames(request_id: int, code: str, message: str) -> list[bytes]:
    return encode("error", request_id, code=code, message=message)


def decode(frames: Sequence[bytes], limits: Union[None, TensorLimits, Callable[[Mapping[str, Any]], TensorLimits]] = None) -> Message:
    """Parse and validate a message; raise :class:`ProtocolError` with a code on any fault.

    With ``limits``, a tensor must match its dtype and per-sample shape, have a
    batch in ``1..max_batch`` and carry exactly the bytes its shape implies.
    ``limits`` may be a function of the header (a peer holding several models
    checks the tensor against the one the header names; it raises
    :class:`ProtocolError` for an unknown one).
    """
    wire = sum(len(f) for f in frames)
    if len(frames) != 2:
        raise ProtocolError("bad_frames", f"expected 2 frames (header, payload), got {len(frames)}")
    raw_header, payload = frames
    if len(raw_header) > MAX_HEADER_BYTES:
        raise ProtocolError("bad_header", f"header is {len(raw_header)} bytes, the limit is {MAX_HEADER_BYTES}")
    if nesting(raw_header) > MAX_HEADER_DEPTH:  # before json.loads, whose recursion a deep header can exhaust
        raise ProtocolError("bad_header", f"header nests deeper than {MAX_HEADER_DEPTH} levels")
    try:
        header = json.loads(raw_header)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ProtocolError("bad_header", "header is not UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_header", "header must be a JSON object")
    if header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            "bad_version", f"protocol version {header.get('v')!r} is not supported (expected {PROTOCOL_VERSION})"
        )
    op = header.get("op")
    if op not in OPS:
        raise ProtocolError("bad_op", f"op {op!r} is not one of {list(OPS)}")
    rid = header.get("id", 0)
    if not isinstance(rid, int) or isinstance(rid, bool) or rid < 0:
        raise ProtocolError("bad_header", f"id {rid!r} must be a non-negative integer")
    if "images" in header:
        return Message(header, None, wire, _images(header, payload, limits))
    if "dtype" not in header:
        if payload:
            raise ProtocolError("bad_payload", f"{len(payload)} payload bytes but no dtype/shape in the header")
        return Message(header, None, wire)
    if callable(limits):
        limits = limits(header)
    tensor = _tensor(header, payload, limits)
    return Message(header, tensor, wire)


def nesting(raw: bytes) -> int:
    """How deep ``[`` and ``{`` nest in a JSON text, brackets inside strings not counted; or,
    where the text opens at most ``MAX_HEADER_DEPTH`` brackets in all (every header this runtime
    writes), that count: a bound on the depth that compares with the limit alike, found without
    the byte-by-byte walk, which took 29 us of a 675-byte result header (issue 39's profile)."""
    opened = raw.count(b"[") + raw.count(b"{")
    if opened <= MAX_HEADER_DEPTH:
        return opened
    depth = deepest = 0
    in_string = escaped = False
    for c in raw:
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:  # quote
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif c in (0x5D, 0x7D):
            depth -= 1
    return deepest


def number(header: Mapping[str, Any], key: str, default: float = 0.0) -> float:
    """A finite number from a peer's header, or :class:`ProtocolError` naming the field."""
    v = header.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ProtocolError("bad_header", f"{key} {v!r} must be a finite number")
    return float(v)


def _tensor(header: Mapping[str, Any], payload: bytes, limits: Optional[TensorLimits]) -> np.ndarray:
    dtype, shape = header.get("dtype"), header.get("shape")
    if not isinstance(dtype, str) or dtype not in _DTYPES:  # a list or object is not hashable: check first
        raise ProtocolError("bad_dtype", f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= MAX_DIMS
        or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_DIM for s in shape)
    ):
        raise ProtocolError("bad_shape", f"shape {str(shape)[:80]} must be a list of 1..{MAX_DIMS} integers in "
                                         f"0..{MAX_DIM}")
    if limits is not None:
        if len(payload) > limits.max_payload_bytes:
            raise ProtocolError(
                "too_large",
                f"payload is {len(payload)} bytes, the limit is {limits.max_payload_bytes} "
                f"(batch {limits.max_batch} of {list(limits.shape)} {limits.dtype})",
            )
        if dtype != limits.dtype:
            raise ProtocolError("bad_dtype", f"dtype {dtype} does not match the expected {limits.dtype}")
        per_sample = shape[1:]
        fits = len(per_sample) == len(limits.shape) and all(
            (1 <= s <= m) if a in limits.dynamic else s == m for a, (s, m) in enumerate(zip(per_sample, limits.shape))
        )
        if not fits:
            want = ", ".join(f"1..{m}" if a in limits.dynamic else str(m) for a, m in enumerate(limits.shape))
            raise ProtocolError("bad_shape", f"shape {shape} does not match the expected [batch, {want}]")
        if not 1 <= shape[0] <= limits.max_batch:
            raise ProtocolError("bad_shape", f"batch {shape[0]} is outside 1..{limits.max_batch}")
    np_dtype = np.dtype(_DTYPES[dtype])
    expected = math.prod(shape) * np_dtype.itemsize  # Python ints: no int64 overflow to slip past this check
    if len(payload) != expected:
        raise ProtocolError(
            "bad_payload", f"payload is {len(payload)} bytes, shape {shape} of {dtype} needs {expected}"
        )
    return np.frombuffer(payload, dtype=np_dtype).reshape(shape)


def _images(header: Mapping[str, Any], payload: bytes, limits) -> tuple[bytes, ...]:
    """The encoded images of an ``images`` message, cut at the lengths its header lists.

    Under ``limits`` (a receiver's bound on the model input) the batch is held to
    ``max_batch`` and the bytes to what the float32 input of that batch would take: an
    encoded image is never larger than its pixels, so a peer cannot use images to send more
    than a tensor could. Whether the files decode is the device's check
    (:func:`coformer.runtime.images.preprocess_images`)."""
    sizes = header.get("images")
    if "dtype" in header:
        raise ProtocolError("bad_header", "a message carries a tensor (dtype) or images, not both")
    if (not isinstance(sizes, list) or not sizes
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes)):
        raise ProtocolError("bad_header", f"images {str(sizes)[:80]} must list each image's length in bytes (> 0)")
    if callable(limits):
        limits = limits(header)
    if limits is not None:
        if len(sizes) > limits.max_batch:
            raise ProtocolError("bad_shape", f"batch {len(sizes)} is outside 1..{limits.max_batch}")
        most = len(sizes) * math.prod(limits.shape) * 4
        if len(payload) > most:
            raise ProtocolError("too_large", f"{len(sizes)} images take {len(payload)} bytes, more than their "
                                             f"pixels as float32 ({most})")
    if sum(sizes) != len(payload):
        raise ProtocolError("bad_payload", f"images list {sum(sizes)} bytes, the payload has {len(payload)}")
    out, at = [], 0
    for n in sizes:
        out.append(payload[at: at + n])
        at += n
    return tuple(out)
