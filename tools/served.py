"""The one way to serve bundles and measure them: every caller (``coformer bench``, the
quickstarts, ``coformer compile --measure``, ``served_bench``) sends its requests through
:func:`measure_bundles` and reads one :class:`Measurement` per bundle, summarised in one
shape (:meth:`Measurement.summary`).

Every bundle is served by real processes (:class:`~coformer.tools.cluster.LocalCluster`,
inside a testbed when given) and every sample goes through a real client socket, one
request at a time. ``throughput`` adds, after a bundle's last pass, a few seconds of N
concurrent clients (threads, each with its own socket and one request in flight): answers
per second, which the central node's micro-batching raises above 1 / latency.

Interleaved passes. This machine's speed drifts by tens of percent from one minute to the
next, so bundles that are compared are measured in the same minutes: the samples are split
into ``passes`` slices, and each pass sends its slice to every bundle in turn. Two ways to
hold the bundles:

* side by side (the default): every bundle is served at once for the whole run, each warmed
  up once. Slices of about 20 requests (:func:`passes_for`) keep each cluster idling
  between its requests as it does when served alone;
* ``alone=True``: each bundle is started for its turn and stopped after it, so that only
  one uses the devices at a time. The bench needs this in a testbed, where the bundles share
  each device's memory limit and a peak or an out-of-memory kill must be one bundle's. Each
  turn warms up again.
"""

from __future__ import annotations

import subprocess
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from coformer.runtime.errors import CoFormerError
from coformer.runtime.timing import summarise

Inputs = Union[np.ndarray, Sequence[str]]

SIDE_BY_SIDE_BLOCK = 20  # requests per bundle per turn when served side by side (passes_for)


@dataclass(frozen=True)
class Sample:
    """One measured request: which sample, and what its answer said of the run."""

    index: int
    round_trip_ms: float  # the client's: send to answer
    prediction: int  # the class index; -1 for an embedding bundle
    bytes_to_workers: int
    bytes_from_workers: int
    timing_ms: Mapping[str, Any]  # the central node's breakdown (coformer.runtime.central)
    embedding: Optional[np.ndarray] = None
    rounds: int = 0  # exchanges with the workers (a baseline's and PRISM's: one or more per layer)


@dataclass
class Measurement:
    """Everything one bundle answered in a run; :meth:`summary` reduces it."""

    name: str
    bundle: Path
    samples: list[Sample] = field(default_factory=list)
    passes: int = 0  # turns that sent requests
    placements: dict[str, Any] = field(default_factory=dict)
    peak_memory_bytes: dict[str, Optional[int]] = field(default_factory=dict)  # in a testbed, the highest per device
    error: Optional[str] = None  # why the bundle stopped being measured (with keep_going)
    out_of_memory_on: list[str] = field(default_factory=list)  # devices whose OOM killer fired in the failed turn
    after: Any = None  # what the ``after`` hook returned
    throughput: dict[int, dict[str, Any]] = field(default_factory=dict)  # concurrent clients -> answers per second

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def status(self) -> str:
        return "ok" if self.ok else "out_of_memory" if self.out_of_memory_on else "failed"

    def summary(self, y: Optional[np.ndarray] = None) -> dict[str, Any]:
        """The one summary shape: every caller reports from it.

        * ``indices``, ``predictions`` (and ``embeddings`` for an embedding bundle): per
          request, sorted by sample index; ``accuracy`` against ``y[indices]`` when ``y`` is given
          (class labels); for an embedding bundle ``y`` is the reference embeddings (the teacher's,
          one row a sample), and ``mean_cosine``, ``min_cosine`` and ``nn_agreement``
          (:func:`coformer.compiler.tasks.embedding_scores`; the nearest neighbours are
          sought among the samples measured) take the place of accuracy;
        * ``latency_ms``: the round trips' statistics (:func:`coformer.runtime.timing.summarise`);
        * ``breakdown_ms``: the median round trip split along the critical path, the central
          node's clock: ``compute`` (its own compute plus, per round, the part that finished
          last), ``transfer`` (the last worker's dispatch-to-answer less its service time: the
          links both ways), ``aggregation``, ``other`` (the rest: message handling, the client
          link, waiting);
        * ``breakdown_ms_median``: the median of every phase the central node times, and of
          each worker's compute, service and queueing;
        * ``runtime_ms_median``: the round trip less the critical path's compute;
        * ``bytes_to_devices``, ``bytes_from_devices`` and their sum ``bytes_per_inference``
          (medians), and the ``rounds`` of exchange with the workers; ``peak_memory_bytes``, ``placements``, ``samples``, ``passes``;
        * ``throughput`` (when measured): per number of concurrent clients, ``answers_per_s``,
          the round trips' ``p50_ms`` and ``p99_ms`` under that load, ``answers``, ``errors``
          and ``mismatched`` (answers whose class differs from the one-at-a-time answer).
        """
        if not self.samples:
            raise CoFormerError(f"{self.name}: no request was measured" + (f" ({self.error})" if self.error else ""))
        s = sorted(self.samples, key=lambda r: r.index)
        tm = [r.timing_ms for r in s]
        med = lambda key: float(np.median([t.get(key, 0.0) for t in tm]))  # noqa: E731
        lat = summarise([r.round_trip_ms for r in s])
        compute, transfer, agg = med("critical_compute"), med("critical_transfer"), med("aggregate")
        to = np.asarray([r.bytes_to_workers for r in s])
        back = np.asarray([r.bytes_from_workers for r in s])
        phases = {"central_compute": med("central_compute"), "wait_for_workers": med("wait_for_workers"),
                  "aggregate": agg, "central_total": med("total"), "dispatch": med("dispatch"),
                  "central_own": med("central_own"), "critical_compute": compute}
        for part in ("compute", "service", "queued"):  # over the answers each worker was part of
            for k in dict.fromkeys(k for t in tm for k in t.get(f"workers_{part}", {})):
                phases[f"worker_{part}.{k}"] = float(np.median([t[f"workers_{part}"][k] for t in tm
                                                                if k in t.get(f"workers_{part}", {})]))
        out: dict[str, Any] = {
            "samples": len(s),
            "passes": self.passes,
            "indices": np.asarray([r.index for r in s]),
            "predictions": np.asarray([r.prediction for r in s]),
            "latency_ms": lat,
            "breakdown_ms": {"compute": compute, "transfer": transfer, "aggregation": agg,
                             "other": max(0.0, lat["median"] - compute - transfer - agg)},
            "breakdown_ms_median": phases,
            "runtime_ms_median": float(np.median([r.round_trip_ms - t.get("critical_compute", 0.0)
                                                  for r, t in zip(s, tm)])),
            "bytes_per_inference": int(np.median(to + back)),
            "bytes_to_devices": int(np.median(to)),
            "bytes_from_devices": int(np.median(back)),
            "rounds": int(np.median([r.rounds for r in s])),
            "peak_memory_bytes": dict(self.peak_memory_bytes),
            "placements": dict(self.placements),
        }
        if self.throughput:
            out["throughput"] = {str(k): v for k, v in sorted(self.throughput.items())}
        if s[0].embedding is not None:
            out["embeddings"] = np.stack([r.embedding for r in s])
        if y is not None and "embeddings" in out:
            import torch

            from coformer.compiler.tasks import embedding_scores

            ref = np.asarray(y, dtype=np.float32)
            if ref.ndim != 2 or ref.shape[1] != out["embeddings"].shape[1]:
                raise CoFormerError(f"{self.name}: an embedding bundle is scored against reference embeddings "
                                    f"[samples, {out['embeddings'].shape[1]}], got an array of shape {list(ref.shape)}")
            out.update(embedding_scores(torch.from_numpy(ref[out["indices"]]),
                                        torch.from_numpy(out["embeddings"].astype(np.float32))))
        elif y is not None:
            out["accuracy"] = float(np.mean(out["predictions"] == np.asarray(y)[out["indices"]]))
        return out


def passes_for(n: int, block: int = SIDE_BY_SIDE_BLOCK) -> int:
    """Passes of about ``block`` requests each over ``n`` samples (side by side)."""
    return max(1, -(-n // block))


class _Served:
    """One bundle being served for a measurement: its cluster, its client, and how a sample is sent."""

    def __init__(self, name: str, bundle: Path, inputs: Inputs, *, bed, throttle: str, local_inputs: Optional[Path],
                 timeout_s: Optional[float], log_dir: Optional[Path], files: Optional[Sequence[Path]] = None) -> None:
        from coformer.tools.cluster import LocalCluster

        self.name, self.inputs, self.local = name, inputs, local_inputs
        # sample i sent as the encoded file files[i] (Client.infer_images), read once here
        self.files = None if files is None else [Path(f).read_bytes() for f in files]
        waits = {} if timeout_s is None else {"timeout_s": timeout_s}
        self.cluster = LocalCluster(bundle, testbed=bed, throttle=throttle, local_inputs=local_inputs,
                                    log_dir=log_dir, **waits)
        self.encoder = None
        if not isinstance(inputs, np.ndarray):  # raw text, tokenised by the client with the bundle's tokenizer
            from coformer.runtime.text import TextEncoder

            self.encoder = TextEncoder.from_bundle(bundle)
        self.waits = waits
        self.client = None

    def __enter__(self) -> "_Served":
        self.cluster.__enter__()
        try:
            self.client = self.cluster.client(**self.waits)
        except BaseException:
            self.cluster.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.client is not None:
                self.client.close()
        finally:
            self.cluster.__exit__(*exc)

    def send(self, i: int, client=None) -> Sample:
        client = client or self.client
        if self.encoder is not None:
            r = client.infer(self.encoder.encode([self.inputs[i]]))
        elif self.files is not None:
            r = client.infer_images([self.files[i]])
        else:
            r = client.infer(self.inputs[i:i + 1], input_index=[i] if self.local is not None else None)
        return Sample(index=int(i), round_trip_ms=r.round_trip_ms,
                      prediction=r.label_index[0] if r.label_index else -1,
                      bytes_to_workers=r.wire_bytes_to_workers, bytes_from_workers=r.wire_bytes_from_workers,
                      timing_ms=r.timing_ms, embedding=r.embedding[0] if r.task == "embedding" else None,
                      rounds=r.rounds)

    def warm_up(self, order: Sequence[int], n: int, max_s: Optional[float]) -> None:
        """``n`` untimed requests (sessions, sockets and caches warm), or until ``max_s``."""
        start = time.monotonic()
        for k in range(n):
            self.send(order[k % len(order)])
            if max_s is not None and time.monotonic() - start > max_s:
                break

    def throughput(self, clients: int, seconds: float, order: Sequence[int],
                   expected: Optional[Mapping[int, int]] = None) -> dict[str, Any]:
        """``clients`` concurrent clients for ``seconds``, each with its own socket and one request
        in flight, cycling through ``order``: answers per second over the window, and the round
        trips under that load. A request that fails (a timeout, an error reply) is counted in
        ``errors`` and its client goes on; an answer whose class differs from ``expected``
        (sample index -> the class it got one request at a time) in ``mismatched``."""
        import threading

        rtts: list[float] = []
        errors: list[str] = []
        mismatched = [0]
        expected = dict(expected or {})
        lock = threading.Lock()
        ready, go = threading.Semaphore(0), threading.Event()
        deadline = [0.0]

        def loop(k: int) -> None:
            released = False
            try:
                with self.cluster.client(**self.waits) as c:
                    try:
                        self.send(order[k % len(order)], c)  # connected and warm before the window opens
                    finally:
                        ready.release()
                        released = True
                    go.wait()
                    j = k
                    while time.monotonic() < deadline[0]:
                        j += clients
                        i = order[j % len(order)]
                        try:
                            r = self.send(i, c)
                        except CoFormerError as e:
                            with lock:
                                errors.append(str(e))
                            continue
                        with lock:
                            rtts.append(r.round_trip_ms)
                            mismatched[0] += int(i in expected and expected[i] != r.prediction)
            except Exception as e:  # noqa: BLE001 - a client that cannot start is an error of the run
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
            finally:
                if not released:
                    ready.release()

        threads = [threading.Thread(target=loop, args=(k,), daemon=True) for k in range(clients)]
        for t in threads:
            t.start()
        for _ in threads:
            ready.acquire(timeout=120.0)
        t0 = time.monotonic()
        deadline[0] = t0 + seconds
        go.set()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        lat = summarise(rtts) if rtts else {"median": None, "p99": None}
        return {"clients": clients, "seconds": wall, "answers": len(rtts),
                "answers_per_s": len(rtts) / wall, "p50_ms": lat["median"], "p99_ms": lat["p99"],
                "errors": len(errors), "mismatched": mismatched[0], **({"first_error": errors[0]} if errors else {})}

    def run(self, chunk: Sequence[int], into: Measurement, min_samples: int, max_s: Optional[float]) -> None:
        """Every sample of ``chunk``, or at least ``min_samples`` of them and then until ``max_s``."""
        start = time.monotonic()
        for k, i in enumerate(chunk):
            if max_s is not None and k >= min_samples and time.monotonic() - start > max_s:
                break
            into.samples.append(self.send(i))


def measure_bundles(bundles: Mapping[str, Path], inputs: Inputs, *, indices: Optional[Sequence[int]] = None,
                    passes: Optional[int] = None, alone: bool = False, warmup: int = 10,
                    max_seconds: Optional[float] = None, min_samples: int = 10, throttle: str = "auto",
                    bed=None, local_inputs: Optional[Mapping[str, Path]] = None, timeout_s: Optional[float] = None,
                    log_dir: Optional[Path] = None, keep_going: bool = False,
                    on_turn: Optional[Callable[[str, int, int], None]] = None,
                    after: Optional[Callable[[str, Any], Any]] = None, throughput: Sequence[int] = (),
                    throughput_s: float = 5.0, files: Optional[Mapping[str, Sequence[Path]]] = None
                    ) -> dict[str, Measurement]:
    """Serve every bundle of ``bundles`` (name -> directory) and send it the samples ``indices``
    of ``inputs`` (default: all, in order) in interleaved passes (module doc); one
    :class:`Measurement` per name.

    Args:
        inputs: model inputs (an array, sample ``i`` sent as ``inputs[i:i+1]``), or raw texts,
            each tokenised by the client with the bundle's own ``tokenizer.json``.
        passes: how many slices the samples are split into; default :func:`passes_for` side
            by side, 1 alone.
        alone: serve each bundle only for its turn (module doc); needed with ``bed``.
        warmup: untimed requests before a bundle's first measured one (each turn, alone);
            alone, the warm-up stops at 10% of the turn's time.
        max_seconds: the time each bundle may take in all, spread over the passes; each turn
            still sends at least its share of ``min_samples``. Default: no limit, every sample.
        bed: a :class:`coformer.tools.testbed.Testbed` to serve in: its devices' peak memory is
            read after each turn and out-of-memory kills are told apart from other failures.
        local_inputs: names whose workers read ``inputs`` from this ``.npy`` themselves: the
            client sends the index, and the input never crosses the links.
        files: names whose client sends sample ``i`` as the encoded image file ``files[name][i]``
            (the files ``inputs`` were preprocessed from): the central node forwards the file's
            bytes and every device decodes it.
        timeout_s: how long the cluster waits for its processes and the client for an answer
            (default: :class:`~coformer.tools.cluster.LocalCluster`'s and the client's own).
        log_dir: each bundle's process logs go to ``log_dir / name``.
        keep_going: a bundle that fails in a turn (a process died, a device ran out of memory,
            a timeout) keeps its ``error`` and is left out of the later passes; the others go
            on. Without it the error is raised; side by side, a bundle that cannot start
            always raises.
        on_turn: called with ``(name, pass, passes)`` before each turn (progress lines).
        after: called with ``(name, client)`` once a bundle's last request is answered, before
            it stops (e.g. a few example requests to show); its value is kept in ``after``.
        throughput: numbers of concurrent clients (e.g. ``(1, 8)``): after a bundle's last
            pass, ``throughput_s`` seconds at each, kept in ``throughput``
            (:meth:`_Served.throughput`).
    """
    if any(int(c) < 1 for c in throughput) or throughput_s <= 0:
        raise CoFormerError(f"throughput clients {list(throughput)} must be >= 1, for more than 0 s ({throughput_s})")
    if alone is False and bed is not None:
        raise CoFormerError("in a testbed the bundles share each device's memory: measure them alone=True")
    names = list(bundles)
    order = list(range(len(inputs)) if indices is None else indices)
    if not names or not order:
        raise CoFormerError(f"nothing to measure: {len(names)} bundle(s), {len(order)} sample(s)")
    passes = (1 if alone else passes_for(len(order))) if passes is None else passes
    if passes < 1:
        raise CoFormerError(f"passes {passes} must be >= 1")
    chunks = [c for c in (order[p::passes] for p in range(passes)) if c]  # more passes than samples: fewer
    passes = len(chunks)
    turn_s = None if max_seconds is None else max_seconds / passes
    turn_min = -(-min_samples // passes)
    local_inputs = dict(local_inputs or {})
    out = {n: Measurement(n, Path(bundles[n])) for n in names}

    def finish(served: _Served, m: Measurement) -> None:  # once a bundle's last pass is answered
        if after is not None:
            m.after = after(m.name, served.client)
        for c in throughput:
            m.throughput[int(c)] = served.throughput(int(c), throughput_s, order,
                                                     {r.index: r.prediction for r in m.samples})

    def serve(name: str) -> _Served:
        return _Served(name, Path(bundles[name]), inputs, bed=bed, throttle=throttle, local_inputs=local_inputs.get(name),
                       timeout_s=timeout_s, log_dir=None if log_dir is None else Path(log_dir) / name,
                       files=(files or {}).get(name))

    with ExitStack() as up:
        served: dict[str, _Served] = {}
        if not alone:  # all at once, warmed once
            for n in names:
                served[n] = up.enter_context(serve(n))
                out[n].placements = _placements(served[n])
            for n in names:
                served[n].warm_up(order, warmup, None)
        for p, chunk in enumerate(chunks):
            for n in names:
                m = out[n]
                if not m.ok:
                    continue
                if on_turn is not None:
                    on_turn(n, p, passes)
                kills = {d.name: bed.oom_kills(d.name) for d in bed.devices} if bed is not None else {}
                try:
                    if alone:
                        _turn_alone(serve(n), m, chunk, bed, warmup, turn_min, turn_s,
                                    finish if p == len(chunks) - 1 else None)
                    else:
                        served[n].run(chunk, m, turn_min, turn_s)
                    m.passes += 1
                except (CoFormerError, OSError, subprocess.SubprocessError) as e:
                    # a process that could not start (a vanished testbed namespace fails in
                    # Popen's preexec_fn) is this bundle's failure too, not the run's
                    if not keep_going:
                        raise
                    m.error = str(e) if isinstance(e, CoFormerError) else f"{type(e).__name__}: {e}"
                    m.out_of_memory_on = [d for d, k in kills.items() if bed.oom_kills(d) > k]
        if not alone:
            for n in names:
                if out[n].ok:
                    finish(served[n], out[n])
    return out


def _turn_alone(s: _Served, m: Measurement, chunk, bed, warmup: int, turn_min: int, turn_s: Optional[float],
                finish: Optional[Callable[[_Served, Measurement], None]]) -> None:
    if bed is not None:
        for d in bed.devices:
            bed.reset_peak_memory(d.name)
    with s:
        m.placements = _placements(s)
        s.warm_up(chunk, warmup, None if turn_s is None else 0.1 * turn_s)
        s.run(chunk, m, turn_min, turn_s)
        if finish is not None:
            finish(s, m)
        used = [d.device for d in s.cluster.manifest.devices]  # the teacher alone leaves the others idle
    if bed is not None:
        for d in bed.devices:
            if d.name in used:
                v = bed.peak_memory(d.name)
                old = m.peak_memory_bytes.get(d.name)
                m.peak_memory_bytes[d.name] = v if old is None else max(old, v or 0)


def _placements(s: _Served) -> dict[str, Any]:
    return {k: {"cores": list(v.cores or []), "cpu_share": v.cpu_share} for k, v in s.cluster.placements.items()}

