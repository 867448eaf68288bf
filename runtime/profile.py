"""Device profiler: time every entry of a profile kit on this device (no torch).

Writes ``DEVICE.json``: the device's environment and, per kit entry, its
configuration and latency statistics. Entries measured elsewhere with NVIDIA's
trtexec (``--exportTimes``) can be merged in by id.

Timing each entry once does not reproduce on a shared machine: some sessions
land in a slow state for their whole life, and the machine drifts. So the kit
is timed in ``rounds``: every round opens a fresh session for every entry (the
first round in kit order, later ones shuffled). ``latency_ms`` keeps the
statistics of all samples pooled, ``round_medians_ms`` each round's median,
and an entry's latency (``latency_estimate_ms``, the one the predictor fits)
is the **minimum of all its samples** (``ESTIMATE``).

Why the minimum: on a shared VM the disturbances only ever add time (another
tenant's use of the shared L3 and memory bus, a descheduled vCPU, a session
that lands in a slow state, the co-profiled devices' context switches), they
come and go within a profile, and they hit sub-models between the L2 and the
L3 hardest. Any statistic that averages over them says partly when an entry
was timed; the fastest of some hundred runs over several sessions is the run
nothing disturbed, and it reproduces. Python's ``timeit`` documentation
recommends the minimum of repeats for the same reason. The comparison of
estimates across profiles is in docs/benchmarks.md ("Profiles: the fastest
run, devices profiled alone"); ``coformer profile-stats`` repeats it
leave-one-out on any set of profiles. How much slower the device is when
served, with disturbances and idle gaps, is measured separately
(``gap_ratio`` below) and applied by the predictor, so the undisturbed
estimate does not make served predictions optimistic.

A served device is not run back to back: it idles between requests, and the
first run after an idle is slower (caches, a descheduled vCPU). Timing with a
gap is too noisy to fit on, so every entry is also run ``gap_iterations``
times with ``gap_ms`` of idle before each (in the first round), and the
profile records each entry's ratio (gapped median / the entry's
``latency_estimate_ms``) as ``gap_ratio`` and their median as
``served_factor``: it carries both the idle slow-down and the disturbances the
estimate leaves out. The slow-down is mostly a fixed cost, large for small
sub-models and lost in large ones, so the latency predictor multiplies a
predicted back-to-back latency by the ratios of entries of about the same
latency (``coformer.compiler.predictor``). A device emulated by a duty cycle
is timed the same way: back to back, each run charged its device time (CPU
time / share) without the emulation's pauses, which would make every run
start cold; its gapped runs do pause, as it will when served.

A profile taken while something else loads the machine is wrong, and every
predictor fitted on it inherits the error. So after the rounds, every entry
without a majority of round medians within ``tolerance`` of their median is
timed again, one round at a time, up to ``extra_rounds`` more rounds (more
sessions, more chances of an undisturbed run), and its latency stays the
minimum of all its samples. ``stability`` in the profile records the share of
entries within tolerance before and after, and how many were timed again; a
profile that stays unstable is worth taking again on a quiet machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from coformer.runtime.files import atomic_write_json
from coformer.runtime.errors import CoFormerError
from coformer.runtime.limits import DeviceLimits
from coformer.runtime.timing import benchmark_engine, cpu_model, summarise
from coformer.runtime.trtexec import load_trtexec_times

try:
    from tqdm.auto import tqdm
except ImportError:  # the device install (coformer[cpu]) has no tqdm: the same profile, without a bar
    class tqdm:  # noqa: N801 - stands in for tqdm's class
        def __init__(self, iterable=None, **_):
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)

        def update(self, n: int = 1) -> None:
            pass

        def close(self) -> None:
            pass

KIT_NAME = "kit.json"
ESTIMATE = "min"  # an entry's latency: this statistic of all its samples (see the module doc)
DEFAULT_ROUNDS = 7


def latency_estimate(latency_ms: Mapping[str, float]) -> float:
    """An entry's latency from the statistics of all its samples (``summarise``, or a
    trtexec import's): their minimum (``ESTIMATE``); the module doc says why."""
    return float(latency_ms[ESTIMATE])


def load_kit(kit_dir: Path) -> dict:
    path = Path(kit_dir) / KIT_NAME
    if not path.is_file():
        raise CoFormerError(f"{kit_dir} is not a profile kit: no {KIT_NAME}")
    kit = json.loads(path.read_text())
    if kit.get("version") != 1:
        raise CoFormerError(f"profile kit version {kit.get('version')!r} is not supported (expected 1)")
    return kit


def kit_feeds(kit: Mapping[str, Any], seed: int = 0, tokens: Optional[int] = None) -> Optional[dict[str, np.ndarray]]:
    """The inputs a kit asks for (a language model's token ids, mask and types, at full
    length, or at ``tokens``: an entry's own length), or None for random float inputs (an
    image model's)."""
    feeds = kit.get("input", {}).get("feeds")
    if not feeds:
        return None
    rng = np.random.default_rng(seed)
    out = {}
    for name, f in feeds.items():
        shape = [int(v) for v in f["shape"]]
        if tokens is not None:
            if not 1 <= int(tokens) <= shape[-1]:
                raise CoFormerError(f"kit entry of {tokens} tokens: the kit's inputs take 1 to {shape[-1]}")
            shape[-1] = int(tokens)
        if f["fill"] == "ids":
            out[name] = rng.integers(4, max(5, int(f["high"])), size=shape).astype(f["dtype"])
        elif f["fill"] in ("ones", "zeros"):
            out[name] = (np.ones if f["fill"] == "ones" else np.zeros)(shape, dtype=f["dtype"])
        else:
            raise CoFormerError(f"kit input {name}: fill {f['fill']!r} is not one of ids, ones, zeros")
    return out


def profile_kit(
    kit_dir: Path,
    device: str = "this-device",
    backend: str = "onnxruntime",
    threads: int = 1,
    limits: DeviceLimits = DeviceLimits(),
    warmup_ms: float = 100.0,
    iterations: int = 10,
    duration_s: float = 0.3,
    idle_ms: float = 0.0,
    trtexec: Optional[Mapping[int, Path]] = None,
    rounds: int = DEFAULT_ROUNDS,
    gap_ms: float = 2.0,
    gap_iterations: int = 10,
    progress: bool = True,
    out: Optional[Path] = None,
    extra_rounds: int = 3,
    tolerance: float = 0.10,
    run_trtexec: bool = False,
    precision: str = "fp16",
) -> dict[str, Any]:
    """Measure every kit entry; ``trtexec`` maps entry ids to ``--exportTimes`` files used instead.

    Each entry gets ``rounds`` sessions (see the module doc), each warmed up for
    ``warmup_ms`` and then run for at least ``iterations`` inferences and
    ``duration_s / rounds`` seconds. ``idle_ms`` idles before each run
    (trtexec ``--idleTime``, default 0 as there): useful with a CFS quota,
    whose bursts after idle run faster than back-to-back work; a duty cycle
    idles after every run by itself. ``gap_iterations`` runs with ``gap_ms``
    idle give the ``served_factor`` (0 iterations: factor 1). Entries whose
    round medians spread by more than ``tolerance`` get up to ``extra_rounds``
    more rounds while no majority of them agrees (see the module doc).

    ``run_trtexec`` times every entry not given in ``trtexec`` with NVIDIA's trtexec instead
    (:func:`coformer.runtime.trtexec.run_trtexec`, at ``precision``, each at its own
    inputs' shapes), keeping its ``--exportTimes`` files in ``OUT.trtexec/`` beside ``out``
    (or a temporary folder). On ``backend="tensorrt"``, ``precision`` is the precision the
    entries' engines are built at.
    """
    if rounds < 1:
        raise CoFormerError(f"rounds {rounds} must be >= 1")
    kit = load_kit(kit_dir)
    trtexec = dict(trtexec or {})
    unknown = sorted(set(trtexec) - {e["id"] for e in kit["entries"]})
    if unknown:
        raise CoFormerError(f"trtexec times given for ids {unknown}, which are not in the kit")
    built_at = None  # the precision trtexec built the entries at
    if run_trtexec:
        built_at = _run_trtexec(kit, Path(kit_dir), trtexec, device, out, warmup_ms, iterations, duration_s, idle_ms,
                                precision, progress)
    timed = [e for e in kit["entries"] if e["id"] not in trtexec]
    timer = _Timer(Path(kit_dir), backend, warmup_ms, iterations, duration_s / rounds, threads, limits, idle_ms,
                   precision, {e["id"]: kit_feeds(kit, tokens=e.get("tokens")) for e in timed})
    timer.rounds(timed, rounds, gap_ms, gap_iterations, f"profile {device}", progress)
    stability = timer.steady(timed, tolerance, extra_rounds, f"profile {device}", progress)
    entries = [_entry_record(e, trtexec, timer) for e in kit["entries"]]
    ratios = [x["gap_ratio"] for x in entries if "gap_ratio" in x]
    profile = {
        "version": 1,
        "device": device,
        "backend": backend,
        "precision": built_at or (precision if backend == "tensorrt" or run_trtexec else "fp32"),
        "threads": threads,
        "cpu_share": limits.cpu_share,
        "rounds": rounds,
        "estimate": ESTIMATE,
        "idle_ms": idle_ms,
        "gap_ms": gap_ms,
        "served_factor": float(np.median(ratios)) if ratios else 1.0,
        "stability": stability,
        "environment": timer.environment or {"cpu": cpu_model()},
        "shape": kit["shape"],
        "entries": entries,
    }
    if out is not None:
        atomic_write_json(Path(out), profile)
    return profile


class _Timer:
    """Times kit entries with :func:`benchmark_engine`, one session per call, keeping every
    entry's samples, each session's median and the gapped sessions' medians."""

    def __init__(self, kit_dir: Path, backend: str, warmup_ms: float, iterations: int, duration_s: float,
                 threads: int, limits: DeviceLimits, idle_ms: float, precision: str, feeds: dict) -> None:
        self.kit_dir, self.backend, self.warmup_ms, self.iterations = kit_dir, backend, warmup_ms, iterations
        self.duration_s, self.threads, self.limits, self.idle_ms = duration_s, threads, limits, idle_ms
        self.precision, self.feeds = precision, feeds
        self.samples: dict[int, list[float]] = {i: [] for i in feeds}
        self.medians: dict[int, list[float]] = {i: [] for i in feeds}
        self.gapped: dict[int, list[float]] = {i: [] for i in feeds}
        self.environment: dict[str, Any] = {}

    def time(self, e: Mapping[str, Any]) -> None:
        timing = benchmark_engine(self.kit_dir / e["file"], self.backend, self.warmup_ms, self.iterations,
                                  self.duration_s, self.threads, inputs=self.feeds[e["id"]], limits=self.limits,
                                  idle_ms=self.idle_ms, keep_samples=True, duty_pauses=False,
                                  precision=self.precision)
        self.samples[e["id"]].extend(timing.compute_samples_ms)
        self.medians[e["id"]].append(timing.compute_ms["median"])
        self.environment = dict(timing.environment)

    def time_gapped(self, e: Mapping[str, Any], gap_ms: float, gap_iterations: int) -> None:
        """``gap_iterations`` runs with ``gap_ms`` idle before each: the served factor's evidence."""
        gapped = benchmark_engine(self.kit_dir / e["file"], self.backend, min(self.warmup_ms, 20.0), gap_iterations,
                                  0.0, self.threads, inputs=self.feeds[e["id"]], limits=self.limits, idle_ms=gap_ms,
                                  precision=self.precision)
        self.gapped[e["id"]].append(gapped.compute_ms["median"])

    def rounds(self, timed: list[dict], rounds: int, gap_ms: float, gap_iterations: int, desc: str,
               progress: bool) -> None:
        """Every entry once a round, and in the first round also gapped (``gap_iterations`` > 0)."""
        bar = tqdm(total=len(timed) * rounds, desc=desc, disable=not progress)
        order = np.random.default_rng(0)
        for r in range(rounds):
            # each round in its own order, so that a disturbance that comes back every round at the
            # same point of it does not land on the same entries every time
            for e in (timed if r == 0 else [timed[i] for i in order.permutation(len(timed))]):
                self.time(e)
                if gap_iterations > 0 and r == 0:  # one gapped run per entry: the factor is a median over entries
                    self.time_gapped(e, gap_ms, gap_iterations)
                bar.update()
        bar.close()

    def steady(self, timed: list[dict], tolerance: float, extra_rounds: int, desc: str, progress: bool) -> dict:
        """Up to ``extra_rounds`` more rounds of the entries whose round medians disagree (module
        doc), while any do; returns the profile's ``stability`` record."""
        stable_before = 1 - len(self.unstable(timed, tolerance)) / max(1, len(timed))
        retimed: set[int] = set()
        extra_done = 0
        for _ in range(max(0, extra_rounds)):
            again = self.unstable(timed, tolerance)
            if not again:
                break
            extra_done += 1
            for e in tqdm(again, desc=f"{desc}: again, {len(again)} unsteady", disable=not progress, leave=False):
                self.time(e)
                retimed.add(e["id"])
        return {"tolerance": tolerance, "within_tolerance_before": stable_before,
                "within_tolerance": 1 - len(self.unstable(timed, tolerance)) / max(1, len(timed)),
                "extra_rounds": extra_done, "entries_retimed": len(retimed)}

    def unstable(self, timed: list[dict], tolerance: float) -> list[dict]:
        """Entries without a majority of round medians within ``tolerance`` of their median."""
        out = []
        for e in timed:
            m = np.asarray(self.medians[e["id"]])
            agree = int(np.sum(np.abs(m / np.median(m) - 1) <= tolerance))
            if len(m) > 1 and agree <= len(m) / 2:
                out.append(e)
        return out


def _run_trtexec(kit: Mapping[str, Any], kit_dir: Path, trtexec: dict, device: str, out: Optional[Path],
                 warmup_ms: float, iterations: int, duration_s: float, idle_ms: float, precision: str,
                 progress: bool) -> Optional[str]:
    """Time every entry not in ``trtexec`` with NVIDIA's trtexec, adding its ``--exportTimes``
    file to ``trtexec``; returns the precision trtexec built the entries at."""
    import tempfile

    from coformer.runtime.trtexec import run_trtexec as trtexec_run

    folder = Path(str(out) + ".trtexec") if out is not None else Path(tempfile.mkdtemp(prefix="coformer-trtexec-"))
    built_at, major = None, None
    for e in tqdm([e for e in kit["entries"] if e["id"] not in trtexec], desc=f"trtexec {device}",
                  disable=not progress):
        feeds = kit_feeds(kit, tokens=e.get("tokens"))
        path = folder / f"entry-{e['id']}.json"
        ran = trtexec_run(kit_dir / e["file"], path, warmup_ms=warmup_ms, iterations=iterations,
                          duration_s=duration_s, idle_ms=idle_ms, precision=precision,
                          shapes={k: v.shape for k, v in feeds.items()} if feeds else None,
                          tensorrt_major=major)
        major = ran["tensorrt_major"]  # read once, from the first run's `trtexec --help`
        built_at = ran["precision"]  # TensorRT 11 has no --fp16: the kit's float32 ONNX stays float32
        trtexec[e["id"]] = path
    return built_at


def _entry_record(e: Mapping[str, Any], trtexec: Mapping[int, Path], timer: _Timer) -> dict[str, Any]:
    """A profile's entry: the kit entry's config and size, and its latency (trtexec's, or ours)."""
    if e["id"] in trtexec:
        t = load_trtexec_times(trtexec[e["id"]])
        latency, source, rm = t["latency_ms"], t["source"], [t["latency_ms"]["median"]]
    else:
        latency, source, rm = summarise(timer.samples[e["id"]]), "benchmark_engine", timer.medians[e["id"]]
    estimate = latency_estimate(latency)
    record = {"id": e["id"], "config": e["config"], "flops": e["flops"], "params": e["params"],
              "latency_estimate_ms": estimate, "latency_ms": latency, "round_medians_ms": rm, "source": source}
    if "sample" in e:  # the kit's sampling configuration, where it differs from the features
        record["sample"] = e["sample"]
    if "tokens" in e:  # a language entry's length, which its config ends with
        record["tokens"] = e["tokens"]
    if timer.gapped.get(e["id"]):
        record["gap_ratio"] = float(np.median(timer.gapped[e["id"]])) / estimate
    return record
