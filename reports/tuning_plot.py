"""tuning.png: what `gpuscope tune` measured, drawn from run.json's `tuning` block alone.

Left, throughput against p99 for every configuration measured, with the Pareto
front (no other configuration is both faster and quicker) and the winner marked:
the trade-off a deployment chooses from. Right, a heatmap of throughput over
predictor count x intra-op threads (the in-process settings without streams or
environment), cells left blank where the search skipped them, so a reader sees
what was measured and what was not. Data preparation (`tuning_points`,
`heatmap`) is apart from drawing, as in plotdata.py / plots.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpuscope.analysis.search import pareto_front

if TYPE_CHECKING:  # pragma: no cover
    from gpuscope.record.run import RunRecord
    from gpuscope.reports.plots import Plot

PLOT_NAME = "tuning.png"


@dataclass(frozen=True)
class TuningPoint:
    label: str
    throughput_rps: float
    p99_ms: float
    status: str  # measured | over_limit | failed
    best: bool


def _key(settings: dict[str, Any]) -> tuple:
    return (settings.get("predictors"), settings.get("intra_op_threads"), bool(settings.get("streams")),
            tuple(sorted((settings.get("env") or {}).items())))


def tuning_points(tuning: dict[str, Any]) -> list[TuningPoint]:
    """Every configuration with a throughput and a p99, the winner flagged."""
    best = (tuning.get("best") or {}).get("settings")
    out = []
    for row in tuning.get("configurations") or []:
        p99 = (row.get("latency_ms") or {}).get("p99")
        tp = row.get("throughput_rps")
        if not isinstance(p99, (int, float)) or not isinstance(tp, (int, float)):
            continue
        out.append(TuningPoint(str(row.get("label") or ""), float(tp), float(p99), str(row.get("status")),
                               best is not None and _key(row["settings"]) == _key(best)))
    return out


def heatmap(tuning: dict[str, Any]) -> tuple[list[int], list[int], list[list[float | None]]]:
    """(predictor counts, thread counts, throughput[thread][count]) over the plain in-process settings;
    None where that configuration was not measured."""
    rows = [r for r in tuning.get("configurations") or [] if not r["settings"].get("streams")
            and not r["settings"].get("env")]
    counts = sorted({r["settings"]["predictors"] for r in rows})
    threads = sorted({r["settings"]["intra_op_threads"] for r in rows})
    grid: list[list[float | None]] = [[None] * len(counts) for _ in threads]
    for r in rows:
        if isinstance(r.get("throughput_rps"), (int, float)) and r.get("status") in ("measured", "over_limit"):
            grid[threads.index(r["settings"]["intra_op_threads"])][counts.index(r["settings"]["predictors"])] = \
                float(r["throughput_rps"])
    return counts, threads, grid


def tuning_png(record: "RunRecord") -> "Plot | None":
    """The plot, or None when the run has no tuning block."""
    tuning = record.tuning
    if not isinstance(tuning, dict) or not isinstance(tuning.get("configurations"), list):
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gpuscope.reports.plots import Plot

    points = tuning_points(tuning)
    counts, threads, grid = heatmap(tuning)
    best = tuning.get("best")
    title = (f"best: {best['label']} at {best['throughput_rps']:.1f} req/s" if best
             else "no configuration met every constraint" if points else "no configuration was measured")
    fig, (ax, hm) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1.3, 1]})
    try:
        colours = {"measured": "#1f77b4", "over_limit": "#d62728", "failed": "#7f7f7f"}
        for status, colour in colours.items():
            chosen = [p for p in points if p.status == status]
            if chosen:
                ax.scatter([p.p99_ms for p in chosen], [p.throughput_rps for p in chosen], color=colour, s=30,
                           label=status.replace("_", " "), zorder=3)
        feasible = [p for p in points if p.status == "measured"]
        front = [feasible[i] for i in pareto_front([(p.p99_ms, p.throughput_rps) for p in feasible])]
        if front:
            ax.plot([p.p99_ms for p in front], [p.throughput_rps for p in front], color="#2ca02c", lw=1.5,
                    drawstyle="steps-post", label="Pareto front", zorder=2)
        for p in points:
            if p.best:
                ax.scatter([p.p99_ms], [p.throughput_rps], marker="*", s=260, color="#ff7f0e", edgecolor="black",
                           label="winner", zorder=4)
                ax.annotate(p.label, (p.p99_ms, p.throughput_rps), textcoords="offset points", xytext=(6, 6),
                            fontsize=8)
        limit = (tuning.get("constraints") or {}).get("max_p99_ms")
        if isinstance(limit, (int, float)):
            ax.axvline(limit, color="#d62728", ls="--", lw=1, label=f"--max-p99-ms {limit:g}")
        ax.margins(x=0.2, y=0.15)
        ax.set_xlabel("p99 latency (ms)")
        ax.set_ylabel("throughput (req/s)")
        ax.set_title("every configuration measured")
        ax.grid(alpha=0.3)
        if points:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "nothing measured", ha="center", va="center", transform=ax.transAxes)
        if counts and threads:
            import numpy as np

            data = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
            image = hm.imshow(data, cmap="viridis", aspect="auto", origin="lower")
            hm.set_xticks(range(len(counts)), [str(c) for c in counts])
            hm.set_yticks(range(len(threads)), [str(t) for t in threads])
            for y, row in enumerate(grid):
                for x, value in enumerate(row):
                    hm.text(x, y, f"{value:.0f}" if value is not None else "skipped", ha="center", va="center",
                            fontsize=8, color="white" if value is not None else "#555555")
            fig.colorbar(image, ax=hm, label="req/s")
        hm.set_xlabel("predictors")
        hm.set_ylabel("intra-op threads")
        hm.set_title("throughput (req/s)")
        fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    return Plot(PLOT_NAME, buffer.getvalue(), title)
