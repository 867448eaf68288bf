"""The bench's report: CoFormer's ratios against each strategy, and the markdown tables."""

from __future__ import annotations

from typing import Any, Optional, Sequence


def physical_limit(row: dict[str, Any], manifest, mbit_s: Optional[float]) -> dict[str, Any]:
    """The fastest a decomposed bundle's round trip could be, from the same run's breakdown:
    every device computes at once, so the answer waits for the slowest of the central
    node's own compute and each worker's compute plus the wire time of what it exchanges
    at the link rate, then for the aggregation:
    ``limit = max(c_central, max_n(c_n + 8 * bytes_n / rate)) + aggregation``.

    ``c`` are the run's medians (``breakdown_ms_median``). ``bytes_n`` is the worker's
    features (4 bytes a channel of its ``feature_dim``, 2 with float16 features) plus its even share of what the
    run measured beyond them (headers both ways, and the input or its index sent to the
    worker). On loopback (no rate) the wire costs nothing. Everything else (message
    handling, queueing, the client's link) is what ``measured_over_limit`` charges the
    runtime with.
    """
    phases = row["breakdown_ms_median"]
    workers = list(manifest.workers)
    import numpy as np

    features = [np.dtype(manifest.feature_dtype).itemsize * w.feature_dim for w in workers]
    rest = max(0, row["bytes_to_devices"] + row["bytes_from_devices"] - sum(features))
    per_device = {manifest.central.device: phases["central_compute"]}
    for w, f in zip(workers, features):
        wire = 0.0 if not mbit_s else 8 * (f + rest / len(workers)) / (mbit_s * 1e3)
        per_device[w.device] = phases.get(f"worker_compute.{w.device}", 0.0) + wire
    limit = max(per_device.values()) + phases["aggregate"]
    slowest = max(per_device, key=per_device.get)
    wire = per_device[slowest] - phases.get(f"worker_compute.{slowest}", 0.0)
    out = {"limit_ms": limit, "measured_over_limit": row["latency_ms"]["median"] / limit,
           "limit_terms_ms": {"devices": per_device, "aggregation": phases["aggregate"]},
           "feature_dtype": manifest.feature_dtype}
    if slowest != manifest.central.device and wire > 0.5 * per_device[slowest] and manifest.feature_dtype == "float32":
        # the wire is most of the slowest device's term: half the bytes would show
        out["hint"] = ("the link carries most of the limit: compile with --feature-dtype float16 to halve "
                       "the features' bytes")
    return out


def ratios(results: Sequence[dict]) -> list[dict[str, Any]]:
    """CoFormer against each other strategy, per bandwidth and input source: how many times
    faster (median latency) and how many times fewer bytes per inference."""
    out = []
    same = lambda a, b: a["bandwidth"] == b["bandwidth"] and a["devices_count"] == b["devices_count"]  # noqa: E731
    for c in [r for r in results if r["strategy"] == "coformer"]:
        row: dict[str, Any] = {"bandwidth": c["bandwidth"], "devices_count": c["devices_count"],
                               "input_source": c["input_source"]}
        for o in results:
            if not same(o, c) or o["strategy"] == "coformer":
                continue
            if o["strategy"] == "uniform" and o["input_source"] != c["input_source"]:
                continue
            row[f"speedup_vs_{o['strategy']}"] = o["latency_ms"]["median"] / c["latency_ms"]["median"]
            for n, t in (c.get("throughput") or {}).items():  # answers per second, N concurrent clients
                theirs = (o.get("throughput") or {}).get(n)
                if theirs and theirs["answers_per_s"]:
                    row[f"throughput_{n}x_vs_{o['strategy']}"] = t["answers_per_s"] / theirs["answers_per_s"]
            if c["bytes_per_inference"] and o["bytes_per_inference"]:  # the teacher alone sends nothing
                row[f"fewer_bytes_vs_{o['strategy']}"] = o["bytes_per_inference"] / c["bytes_per_inference"]
        for name in ("teacher", "student", "student_matched"):
            other = next((o for o in results if same(o, c) and o["strategy"] == name), None)
            if other is None:
                continue
            if "mean_cosine" in c:  # an embedding bundle: cosine to the teacher's embedding
                row[f"cosine_vs_{name}"] = c["mean_cosine"] - other["mean_cosine"]
                row[f"nn_agreement_vs_{name}_points"] = 100 * (c["nn_agreement"] - other["nn_agreement"])
            else:
                row[f"accuracy_vs_{name}_points"] = 100 * (c["accuracy"] - other["accuracy"])
        out.append(row)
    return out


def score(row: dict[str, Any]) -> float:
    """A row's score: its accuracy, or an embedding bundle's mean cosine to the teacher."""
    return row["mean_cosine"] if "mean_cosine" in row else row["accuracy"]


def score_text(row: dict[str, Any]) -> str:
    return f"{row['mean_cosine']:.4f}" if "mean_cosine" in row else f"{100 * row['accuracy']:.1f}%"


def collaboration_line(row: dict[str, Any]) -> str:
    """``coformer on 3 devices (nested): +0.8 points over edge-a alone`` (cosine for an embedding)."""
    c = row["collaboration"]
    gain = f"{c['gain']:+.4f} cosine" if row.get("task") == "embedding" else f"{100 * c['gain']:+.1f} points"
    return (f"{row['strategy']} on {row['devices_used']} devices ({row.get('decomposition', 'nested')}): {gain} over "
            f"{c['best_single_device']} alone")


def _mib(n: Optional[int]) -> str:
    return "–" if not n else f"{n / 2**20:.0f}"


def markdown(report: dict[str, Any]) -> str:
    """The rows, the ratios and the lines under them. An embedding bench's rows give the mean
    cosine to the teacher's embedding for accuracy, and nearest-neighbour agreement (within the
    samples served) for agreement with the teacher."""
    embedding = report.get("task") == "embedding"
    score_name, agree_name = ("mean cosine", "NN agreement") if embedding else ("accuracy", "agrees with teacher")
    lines = [f"| strategy | devices | bandwidth | input from | {score_name} | {agree_name} | median ms | p90 ms | p99 ms "
             "| compute | transfer | aggregation | other | limit ms | x limit | answers/s (clients) | bytes/inference "
             "| peak MiB per device | samples |",
             "|" + "---|" * 19]
    for r in report["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['strategy']} | {r['devices_count']} | {r['bandwidth']} | {r['input_source']} | "
                         f"{r['status']} {', '.join(r.get('out_of_memory_on', []))} |" + " |" * 14)
            continue
        b, lat = r["breakdown_ms"], r["latency_ms"]
        peak = " / ".join(_mib(v) for v in r["peak_memory_bytes"].values()) or "–"
        agree = r.get("nn_agreement" if embedding else "agreement_with_teacher")
        limit = f"{r['limit_ms']:.2f}" if "limit_ms" in r else "–"
        over = f"{r['measured_over_limit']:.1f}x" if "limit_ms" in r else "–"
        load = " / ".join(f"{t['answers_per_s']:.0f} ({n})" for n, t in (r.get("throughput") or {}).items()) or "–"
        lines.append(
            f"| {r['strategy']} | {r['devices_count']} | {r['bandwidth']} | {r['input_source']} | {score_text(r)} | "
            f"{'–' if agree is None else f'{100 * agree:.1f}%'} | {lat['median']:.2f} | {lat['p90']:.2f} | "
            f"{lat['p99']:.2f} | {b['compute']:.2f} | {b['transfer']:.2f} | {b['aggregation']:.2f} | "
            f"{b['other']:.2f} | {limit} | {over} | {load} | {r['bytes_per_inference']:,} | {peak} | {r['samples']} |")
    if report["ratios"]:
        lines += ["", "CoFormer against each strategy (x times faster, median latency; x times fewer bytes):", ""]
        keys = sorted({k for r in report["ratios"] for k in r if k.startswith(("speedup", "fewer"))})
        lines.append("| devices | bandwidth | input from | " + " | ".join(k.replace("_", " ") for k in keys) + " |")
        lines.append("|" + "---|" * (len(keys) + 3))
        for r in report["ratios"]:
            lines.append(f"| {r['devices_count']} | {r['bandwidth']} | {r['input_source']} | "
                         + " | ".join("–" if k not in r else f"{r[k]:.1f}x" for k in keys) + " |")
    gains = sorted({collaboration_line(r) for r in report["results"] if r.get("collaboration")})
    if gains:
        lines += ["", "Collaboration gain (the ensemble's score minus the best single device's, the compile's test "
                      "split): " + "; ".join(gains) + "."]
    hints = sorted({f"{r['strategy']} at {r['bandwidth']}: {r['hint']}" for r in report["results"] if r.get("hint")})
    if hints:
        lines += [""] + hints
    m = report.get("memory")
    if m:
        lines += ["", f"Memory: on {m['device']} (limit {_mib(m['memory_limit_bytes'])} MiB) the teacher "
                      f"ends {m['teacher']['status']} (peak {_mib(m['teacher']['peak_memory_bytes'])} MiB); its "
                      f"sub-model ends {m['submodel']['status']} (peak {_mib(m['submodel']['peak_memory_bytes'])} MiB)."]
    return "\n".join(lines) + "\n"



def format_summary(report: dict[str, Any]) -> str:
    """The markdown tables and the plots written, as the command prints them."""
    return markdown(report) + (f"\nplots: {', '.join(report.get('plots', [])) or 'none (matplotlib missing)'}\n")
