"""The bench's plots, as PNGs: where the time goes, accuracy against latency, and the
device-count and bandwidth sweeps (matplotlib, when it is installed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

def save_png(fig, path: Path) -> str:
    """Write ``fig`` to ``path`` through a temporary file (never a half-written PNG), close
    it, and return the file's name."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path.name


def plots(report: dict[str, Any], out_dir: Path) -> list[str]:
    """Latency breakdown bars, accuracy vs latency, and the bandwidth sweep, as PNGs (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    res = [r for r in report["results"] if r["status"] == "ok"]
    if not res:
        return []
    label = lambda r: r["strategy"] + ("" if r["strategy"] not in ("coformer", "uniform")  # noqa: E731
                                       else f" ({r['input_source']} input)")
    written = []
    first_bw = res[0]["bandwidth"]
    most = max(r["devices_count"] for r in res)
    rows = [r for r in res if r["bandwidth"] == first_bw and r["devices_count"] == most]

    def save(fig, name: str) -> None:
        written.append(save_png(fig, Path(out_dir) / name))

    # shares of each strategy's median (stacked bars on a log axis would distort them), total written at the end
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    left = np.zeros(len(rows))
    totals = np.array([sum(r["breakdown_ms"].values()) for r in rows])
    for part, color in (("compute", "#4c72b0"), ("transfer", "#dd8452"), ("aggregation", "#55a868"),
                        ("other", "#bbbbbb")):
        vals = 100 * np.array([r["breakdown_ms"][part] for r in rows]) / np.maximum(totals, 1e-9)
        ax.barh([label(r) for r in rows], vals, left=left, color=color, label=part)
        left += vals
    for i, r in enumerate(rows):
        ax.text(101, i, f"{r['latency_ms']['median']:.1f} ms", va="center", fontsize=8)
    ax.set_xlim(0, 118)
    ax.set_xlabel("share of the median latency, %")
    ax.set_title(f"Where the time goes at {first_bw}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.45, -0.22), ncol=4, fontsize=8, frameon=False)
    save(fig, "latency_breakdown.png")

    from coformer.tools.bench.report import score

    embedding = report.get("task") == "embedding"  # scored by mean cosine to the teacher's embedding
    scale = 1.0 if embedding else 100.0
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["latency_ms"]["median"], scale * score(r), s=40)
        ax.annotate(label(r), (r["latency_ms"]["median"], scale * score(r)), fontsize=7,
                    xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("median latency, ms (log)")
    ax.set_ylabel("mean cosine to the teacher" if embedding else "accuracy, %")
    ax.set_title(f"{'Mean cosine' if embedding else 'Accuracy'} against latency at {first_bw}")
    save(fig, "accuracy_vs_latency.png")

    counts = sorted({r["devices_count"] for r in res})
    if len(counts) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in sorted({label(r) for r in res}):
            pts = sorted((r["devices_count"], r["latency_ms"]["median"]) for r in res
                         if label(r) == name and r["bandwidth"] == first_bw)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_yscale("log")
        ax.set_xticks(counts)
        ax.set_xlabel("devices")
        ax.set_ylabel("median latency, ms")
        ax.set_title(f"Device-count sweep at {first_bw}")
        ax.legend(fontsize=7)
        save(fig, "devices_sweep.png")

    sweep = [r for r in res if r["bandwidth_mbit_s"] and r["devices_count"] == most]
    if len({r["bandwidth"] for r in sweep}) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in sorted({label(r) for r in sweep}):
            pts = sorted((r["bandwidth_mbit_s"], r["latency_ms"]["median"]) for r in sweep if label(r) == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link rate, Mbit/s")
        ax.set_ylabel("median latency, ms")
        ax.set_title("Bandwidth sweep")
        ax.legend(fontsize=7)
        save(fig, "bandwidth_sweep.png")
    return written
