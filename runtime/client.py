"""Python client for a served bundle: send a model input (a tensor, texts or image files), get logits and labels."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import zmq

from coformer.runtime import protocol
from coformer.runtime.errors import CoFormerError


@dataclass(frozen=True)
class Result:
    """One answer. ``logits`` is the bundle's output: class logits, or for an embedding bundle
    (``task == "embedding"``) the embeddings themselves, also as :attr:`embedding`."""

    logits: np.ndarray
    label_index: list[int]
    wire_bytes_from_workers: int
    timing_ms: Mapping[str, Any] = field(default_factory=dict)
    round_trip_ms: float = 0.0
    wire_bytes_to_workers: int = 0
    rounds: int = 0
    task: str = "classification"
    # the devices whose features this answer lacks (they were down or late at the deadline): the
    # central node answered with the bundle's fallback aggregator without them
    degraded: tuple = ()

    @property
    def embedding(self) -> np.ndarray:
        if self.task != "embedding":
            raise CoFormerError("this bundle answers with class logits, not an embedding")
        return self.logits


class ServerError(CoFormerError):
    """The server answered with an error (``code`` says which kind)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class Client:
    """Talk to a central node.

    Args:
        endpoint: the central node's front endpoint, e.g. ``tcp://10.0.0.2:5555``.
        timeout_s: how long to wait for each reply; a server that does not
            answer in time raises :class:`CoFormerError` (ZeroMQ never says a
            peer is gone, so every call has a deadline).
        keys: this client's key folder (from ``coformer-runtime keys``, a path or
            :class:`~coformer.runtime.security.RoleKeys`): the link runs CURVE, pinned
            to the central node's key, and bundles this client reads (labels,
            preprocessing, tokenizer) must carry the operator's signature.
        insecure: talk plain TCP to a non-loopback endpoint (refused otherwise).
    """

    def __init__(self, endpoint: str, timeout_s: float = 30.0, keys: Any = None, insecure: bool = False) -> None:
        from coformer.runtime.security import RoleKeys, curve_client, load_keys, require_security

        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.keys = keys if keys is None or isinstance(keys, RoleKeys) else load_keys(Path(keys), "client")
        secure = require_security(self.keys, insecure, (endpoint,), "client")
        self._ids = itertools.count(1)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if secure:
            curve_client(self._sock, self.keys)
        self._sock.connect(endpoint)

    @property
    def trust(self) -> Optional[bytes]:
        """The operator's verify key bundles must be signed with (None: not checked)."""
        return self.keys.operator if self.keys is not None else None

    def _call(self, frames: list[bytes], rid: int, timeout_s: Optional[float] = None) -> protocol.Message:
        self._sock.send_multipart(frames)
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            left_ms = int((deadline - time.monotonic()) * 1e3)
            if left_ms <= 0 or not self._sock.poll(left_ms):
                raise CoFormerError(f"no reply from {self.endpoint} within "
                                    f"{self.timeout_s if timeout_s is None else timeout_s:g} s")
            msg = protocol.decode(self._sock.recv_multipart())
            if msg.id != rid:
                continue  # the late reply to an earlier call that timed out
            if msg.op == "error":
                raise ServerError(str(msg.header.get("code")), str(msg.header.get("message")))
            return msg

    def infer(self, x: np.ndarray, input_index: Optional[list[int]] = None,
              deadline_s: Optional[float] = None) -> Result:
        """Run one input (a batch, shape ``[B, *input.shape]``) through the cluster.

        ``input_index``: the rows of the workers' ``--local-inputs`` that hold the
        same batch (each device captures the input itself, as in the paper);
        the central node then sends the workers the index, not the tensor.

        ``deadline_s``: when the reply is due, from now. The central node waits for the
        workers until a little before it (it keeps ``min(10%, 25 ms)`` to aggregate and
        reply); a device late by then is left out and the answer comes from the bundle's fallback
        aggregator, with ``Result.degraded`` naming it (default: the central node's
        ``--timeout``). The reply itself is awaited up to ``deadline_s`` plus one second,
        or the client's ``timeout_s``.
        """
        fields = {} if input_index is None else {"input_index": [int(i) for i in input_index]}
        return self._infer(deadline_s, fields, tensor=np.asarray(x))

    def infer_images(self, images: Sequence[Any], deadline_s: Optional[float] = None) -> Result:
        """Run encoded image files (paths, or their bytes: JPEG, PNG, WebP) through a bundle
        whose preprocessing is timm's, as they are: the central node decodes them for its own
        sub-model and forwards the same bytes to the workers, each of which decodes and
        preprocesses them too (:mod:`coformer.runtime.images`, the code :meth:`classify_images`
        runs here). A 224x224 JPEG is tens of KB on each link where its float32 pixels are
        602 KB. ``deadline_s`` as for :meth:`infer`; a file that does not decode is answered
        ``bad_image``."""
        files = [b if isinstance(b, (bytes, bytearray)) else _read_file(b) for b in images]
        if not files:
            raise CoFormerError("no image given")
        for name, data in zip(images, files):
            _check_image(name, data)
        return self._infer(deadline_s, {}, images=[bytes(f) for f in files])

    def _infer(self, deadline_s: Optional[float], fields: dict, **payload) -> Result:
        rid = next(self._ids)
        start = time.perf_counter()
        if deadline_s is not None:
            if not 0.001 <= deadline_s <= 3600:
                raise CoFormerError(f"deadline_s {deadline_s!r} must be between 0.001 and 3600 seconds")
            fields["deadline_ms"] = deadline_s * 1e3
        wait = None if deadline_s is None else deadline_s + 1.0
        msg = self._call(protocol.encode("infer", rid, **payload, **fields), rid, wait)
        rtt = (time.perf_counter() - start) * 1e3
        return Result(
            logits=msg.tensor,
            label_index=list(msg.header.get("label_index", [])),
            wire_bytes_from_workers=int(msg.header.get("wire_bytes_from_workers", 0)),
            timing_ms=dict(msg.header.get("timing_ms", {})),
            round_trip_ms=rtt,
            wire_bytes_to_workers=int(msg.header.get("wire_bytes_to_workers", 0)),
            rounds=int(msg.header.get("rounds", 0)),
            task=str(msg.header.get("task", "classification")),
            degraded=tuple(str(d) for d in msg.header.get("degraded", []) or []),
        )

    def embed(self, inputs: Any, bundle: Any = None, batch_size: int = 32) -> np.ndarray:
        """Embeddings ``[N, dim]`` from an embedding bundle, for ``inputs``: texts (strings, or
        ``[first, second]`` pairs) tokenised with ``bundle``'s tokenizer (its folder, or a
        :class:`~coformer.runtime.text.TextEncoder`), image files (with the bundle's folder: its
        preprocessing is applied here), or model inputs as an array ``[N, *input.shape]``. Sent in
        batches of ``batch_size``; a bad text or file raises before its batch is sent."""
        items = inputs if isinstance(inputs, np.ndarray) else list(inputs)
        if not len(items):
            raise CoFormerError("nothing to embed")
        encode = self._encoder_for(items, bundle, self.trust)
        out = []
        for lo in range(0, len(items), batch_size):
            r = self.infer(encode(items[lo: lo + batch_size]))
            out.append(r.embedding)
        return np.concatenate(out)

    @staticmethod
    def _encoder_for(items: Any, bundle: Any, trust: Optional[bytes] = None):
        """How ``embed`` turns a batch of ``items`` into model inputs."""
        if isinstance(items, np.ndarray):
            return lambda batch: batch
        if not isinstance(bundle, (str, Path)) and hasattr(bundle, "encode"):  # a TextEncoder (a str has .encode)
            return bundle.encode
        if bundle is None:
            raise CoFormerError("texts and image files need the bundle (its folder) to be tokenised or preprocessed")
        from coformer.runtime.manifest import load_manifest

        manifest = load_manifest(Path(bundle), verify=False, trust=trust)
        if manifest.input.is_text:
            from coformer.runtime.text import TextEncoder

            return TextEncoder.from_bundle(Path(bundle), manifest).encode
        from coformer.runtime.images import preprocess_images

        return lambda batch: preprocess_images(batch, manifest.input.preprocessing)

    def classify(self, texts, encoder, labels: Optional[list[str]] = None) -> tuple[list[str], Result]:
        """Tokenise ``texts`` (strings, or ``[first, second]`` pairs) with ``encoder`` (a
        :class:`~coformer.runtime.text.TextEncoder`, e.g. ``TextEncoder.from_bundle(BUNDLE)``),
        send the token ids and return the predicted label names with the full result.
        Bad text (empty, too long, a pair where one text is expected) raises before anything is sent."""
        result = self.infer(encoder.encode(texts))
        names = labels or []
        return [names[i] if i < len(names) else str(i) for i in result.label_index], result

    def classify_images(self, images: Sequence[Any], bundle: Any,
                        labels: Optional[Sequence[str]] = None, top_k: int = 5,
                        batch_size: int = 16) -> tuple[list[list[tuple[str, float]]], list[Result]]:
        """Classify image files (paths, encoded bytes, uint8 arrays or Pillow images) with a bundle
        whose preprocessing is timm's. ``bundle`` is the bundle's folder, its
        :class:`~coformer.runtime.manifest.Manifest`, or the preprocessing record itself
        (``manifest.input.preprocessing``; then pass ``labels``). Files (paths or bytes) are sent
        as they are and decoded on each device (:meth:`infer_images`); arrays and Pillow images
        are preprocessed here with Pillow and numpy (:mod:`coformer.runtime.images`, the same
        code). Sent in batches of ``batch_size`` and answered with each image's ``top_k``
        (label, probability) pairs, most likely first; also returns the raw result of every
        batch. A file that is missing or not an image raises naming it before its batch is sent."""
        from coformer.runtime.images import is_image_spec, preprocess_images
        from coformer.runtime.manifest import Manifest, load_manifest

        if isinstance(bundle, (str, Path)):
            bundle = load_manifest(Path(bundle), verify=False, trust=self.trust)
        if isinstance(bundle, Manifest):
            labels = labels if labels is not None else bundle.labels
            preprocessing = bundle.input.preprocessing
        else:
            preprocessing = bundle
        if not is_image_spec(preprocessing):
            raise CoFormerError("this bundle does not take image files (its preprocessing is "
                                f"{preprocessing.get('kind')!r}, source {preprocessing.get('source')!r})")
        if top_k < 1:
            raise CoFormerError(f"top_k {top_k} must be >= 1")
        images = list(images)
        if not images:
            raise CoFormerError("no image given")
        names = list(labels or [])
        answers, results = [], []
        # Files (paths or bytes) go as they are, decoded on each device (infer_images: a tenth of the
        # bytes or less); arrays and Pillow images are preprocessed here and go as float32 pixels.
        files = all(isinstance(i, (str, Path, bytes, bytearray)) for i in images)
        for lo in range(0, len(images), batch_size):  # decoded a batch at a time: memory stays flat
            batch = images[lo: lo + batch_size]
            r = self.infer_images(batch) if files else self.infer(preprocess_images(batch, preprocessing))
            results.append(r)
            z = r.logits - r.logits.max(axis=-1, keepdims=True)
            p = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
            for row in p:
                best = np.argsort(-row, kind="stable")[:top_k]
                answers.append([(names[i] if i < len(names) else str(int(i)), float(row[i])) for i in best])
        return answers, results

    def send_raw(self, frames: list[bytes], timeout_s: Optional[float] = None) -> protocol.Message:
        """Send hand-made frames and return the reply as is (errors included); for tests and probes."""
        self._sock.send_multipart(frames)
        if not self._sock.poll(int((timeout_s or self.timeout_s) * 1e3)):
            raise CoFormerError(f"no reply from {self.endpoint} within {timeout_s or self.timeout_s:g} s")
        return protocol.decode(self._sock.recv_multipart())

    def status(self, timeout_s: Optional[float] = None) -> dict:
        rid = next(self._ids)
        return dict(self._call(protocol.encode("status", rid), rid, timeout_s).header)

    def wait_ready(self, timeout_s: float = 60.0) -> dict:
        """Poll ``status`` until every worker has registered; raise naming the missing ones."""
        deadline = time.monotonic() + timeout_s
        status: dict = {}
        while time.monotonic() < deadline:
            try:
                status = self.status(timeout_s=min(2.0, max(0.1, deadline - time.monotonic())))
            except CoFormerError:
                continue
            if status.get("ready"):
                return status
            time.sleep(0.05)
        raise CoFormerError(
            f"cluster at {self.endpoint} not ready after {timeout_s:g} s; missing workers: {status.get('missing', '?')}"
        )

    def close(self) -> None:
        self._sock.close(0)
        self._ctx.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_file(path: Any) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise CoFormerError(f"image file {path} cannot be read: {e.strerror or e}") from None


def _check_image(name: Any, data: bytes) -> None:
    """A file that is not an image is refused here, naming it, before anything is sent (its header
    only: the devices decode it)."""
    import io

    from coformer.runtime.images import pillow

    try:
        pillow().open(io.BytesIO(data))
    except Exception as e:  # Pillow's UnidentifiedImageError, OSError...
        label = "the image bytes" if isinstance(name, (bytes, bytearray)) else str(name)
        raise CoFormerError(f"{label} is not an image Pillow can read: {e}") from None
