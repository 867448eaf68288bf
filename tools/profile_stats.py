"""``coformer profile-stats``: how far a set of device profiles can be trusted.

A predictor's held-out accuracy mixes two things: the predictor's own error
(a sub-model it systematically gets wrong) and the profile's noise (an entry
timed slow on a busy machine). One profile cannot tell them apart; several
profiles of the same kit can. For every profile this reports:

* the accuracy over every entry, each predicted by an analytic fit without it
  (leave-one-out; :func:`coformer.compiler.predictor.all_entries_report`);
* the same for four estimates of an entry's latency (the median of the first
  three round medians, the median of all, their lower quartile, and the
  minimum of all samples: the profiler's), so the profiler's choice can be
  checked on any device (``coformer.runtime.profile`` says why it is the
  minimum);
* the served slow-down (``gap_ratio``) by size: below 1 ms, 1-5 ms, above 5 ms.

Over profiles of the same kit:

* how often two profiles of one device agree within 10% on an entry's latency;
* per entry, the mean leave-one-out error over the profiles (the predictor's
  systematic error) and its spread (noise); and the share of all predictions
  within 10% once each entry's systematic error is taken out: about what a
  model without systematic error would reach on profiles this noisy (the
  mean is taken over these same profiles, so it flatters a little).

Run it on the quickstart's profiles (``coformer-quickstart/profiles/*.json``
that are not ``*.predictor.json``) or on a device's profiles taken on
different days. It needs no model and no kit files.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from coformer.compiler.predictor import all_entries_report, cross_validate, profile_rows
from coformer.runtime.files import atomic_write_json, read_json
from coformer.runtime.errors import CoFormerError
from coformer.runtime.profile import latency_estimate

BANDS_MS = {"below 1 ms": (0.0, 1.0), "1-5 ms": (1.0, 5.0), "5 ms and above": (5.0, float("inf"))}
# estimates of an entry's latency, each from the entry's round medians or the statistics of all its samples
ESTIMATES = {
    "median of the first 3 rounds": lambda e: float(np.median(e["round_medians_ms"][:3])),
    "median of all rounds": lambda e: float(np.median(e["round_medians_ms"])),
    "lower quartile of the round medians": lambda e: float(np.quantile(e["round_medians_ms"], 0.25)),
    "minimum of all samples (the profiler's)": lambda e: latency_estimate(e["latency_ms"]),
}


def load_profiles(paths: Sequence[Path]) -> list[dict[str, Any]]:
    out = []
    for path in paths:
        d = read_json(Path(path), f"profile {path} does not exist")
        if not isinstance(d, dict) or not isinstance(d.get("entries"), list):
            raise CoFormerError(f"{path} is not a device profile (no 'entries'; a predictor file?)")
        if len(d["entries"]) < 7:
            raise CoFormerError(f"{path} has {len(d['entries'])} entries; at least 7 are needed")
        out.append({**d, "path": str(path)})
    return out


def _within(err: np.ndarray) -> float:
    return float(np.mean(np.abs(err) <= 0.10))


def _one(profile: Mapping[str, Any]) -> dict[str, Any]:
    every = all_entries_report(profile, "analytic", keep_errors=True)
    out: dict[str, Any] = {"path": profile["path"], "device": profile.get("device", ""),
                           "entries": len(profile["entries"]), "stability": profile.get("stability"),
                           "all_entries": every}
    rows = profile_rows(profile)
    if all(len(e.get("round_medians_ms") or []) >= 3 and "min" in e.get("latency_ms", {})
           for e in profile["entries"]):
        est = {}
        for name, f in ESTIMATES.items():
            again = [{**r, "latency_ms": f(e)} for r, e in zip(rows, profile["entries"])]
            est[name] = _within(cross_validate(again, "analytic"))
        out["estimates_within_10pct"] = est
    bands = {}
    for band, (lo, hi) in BANDS_MS.items():
        g = [e["gap_ratio"] for e, r in zip(profile["entries"], rows)
             if "gap_ratio" in e and lo <= r["latency_ms"] < hi]
        if g:
            bands[band] = {"n": len(g), "min": float(np.min(g)), "median": float(np.median(g)),
                           "max": float(np.max(g))}
    out["gap_ratio"] = bands
    return out


def profile_stats(profiles: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The report the module doc describes, as a dict (JSON-ready)."""
    report: dict[str, Any] = {"profiles": [_one(p) for p in profiles]}
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(profiles):
        groups.setdefault(tuple(tuple(e["config"]) for e in p["entries"]), []).append(i)
    report["kits"] = []
    for configs, members in groups.items():
        if len(members) < 2:
            continue
        lat = np.asarray([[r["latency_ms"] for r in profile_rows(profiles[i])] for i in members])
        pairs = [{"a": profiles[a]["path"], "b": profiles[b]["path"],
                  "agree_within_10pct": float(np.mean(np.abs(lat[x] / lat[y] - 1) <= 0.10))}
                 for (x, a), (y, b) in itertools.combinations(enumerate(members), 2)
                 if profiles[a].get("device") == profiles[b].get("device")]
        err = np.asarray([report["profiles"][i]["all_entries"]["errors"] for i in members])
        mean, sd = err.mean(0), err.std(0)
        order = np.argsort(-np.abs(mean), kind="stable")[:8]
        report["kits"].append({
            "profiles": [profiles[i]["path"] for i in members], "entries": len(configs), "pairs": pairs,
            "within_10pct": _within(err), "within_10pct_without_systematic": _within(err - mean),
            "systematic": [{"config": list(configs[j]), "mean_error": float(mean[j]), "sd": float(sd[j]),
                            "misses": int(np.sum(np.abs(err[:, j]) > 0.10))} for j in order],
        })
    for p in report["profiles"]:
        p["all_entries"].pop("errors")
    return report


def format_report(report: Mapping[str, Any]) -> str:
    lines = []
    for p in report["profiles"]:
        e = p["all_entries"]
        lines.append(f"{p['path']} ({p['device']}, {p['entries']} entries): leave-one-out "
                     f"{e['within_10pct'] * 100:.0f}% within 10%, MAPE {e['mape'] * 100:.1f}%")
        for name, v in p.get("estimates_within_10pct", {}).items():
            lines.append(f"    estimate {name}: {v * 100:.0f}% within 10% leave-one-out")
        for band, g in p["gap_ratio"].items():
            lines.append(f"    gap ratio {band}: {g['min']:.2f}-{g['max']:.2f}, median {g['median']:.2f} "
                         f"({g['n']} entries)")
    for k in report["kits"]:
        lines.append(f"kit of {k['entries']} entries, {len(k['profiles'])} profiles: "
                     f"{k['within_10pct'] * 100:.0f}% of leave-one-out predictions within 10%; "
                     f"{k['within_10pct_without_systematic'] * 100:.0f}% once each entry's mean error "
                     f"(systematic) is taken out")
        agree = [x["agree_within_10pct"] for x in k["pairs"]]
        if agree:
            lines.append(f"    two profiles agree within 10% on {min(agree) * 100:.0f}-{max(agree) * 100:.0f}% of "
                         f"entries ({len(agree)} pairs of profiles of one device)")
        for s in k["systematic"]:
            lines.append(f"    {s['config']}: mean error {s['mean_error'] * 100:+.1f}% (sd {s['sd'] * 100:.1f}), "
                         f"missed by {s['misses']} of {len(k['profiles'])}")
    return "\n".join(lines)


def main(paths: Sequence[Path], json_out: Optional[Path] = None) -> int:
    report = profile_stats(load_profiles(paths))
    print(format_report(report))
    if json_out is not None:
        atomic_write_json(Path(json_out), report)
    return 0
