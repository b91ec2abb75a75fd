"""compare.png: threads versus processes, memory and throughput against the predictor count.

Reads only record.extra["comparison"] (plain JSON from `gpuscope compare`).
Drawn on a bare matplotlib Figure with the Agg canvas (no pyplot, no global
backend switch), matplotlib imported inside the function so the CLI starts fast.
Panels: host memory (sum of USS), device memory when measured (NVML), throughput.
"""
from __future__ import annotations

import io
import textwrap
from typing import Any

MODE_STYLE = {"threads": ("#0072B2", "o", "N threads, 1 process"),
              "processes": ("#D55E00", "s", "N processes, 1 predictor each")}
MiB = 1024**2


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def series(comparison: dict[str, Any], key: str, scale: float = 1.0) -> dict[str, tuple[list[int], list[float]]]:
    """Per mode: the predictor counts and the values of `key` where it was measured (no matplotlib)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for mode in MODE_STYLE:
        rows = sorted((r for r in comparison.get("rows", []) if r.get("mode") == mode and not r.get("error")),
                      key=lambda r: r.get("predictors", 0))
        xs, ys = [], []
        for row in rows:
            value = _number(row.get(key))
            if value is not None and isinstance(row.get("predictors"), int):
                xs.append(row["predictors"])
                ys.append(value / scale)
        if xs:
            out[mode] = (xs, ys)
    return out


def compare_png(comparison: dict[str, Any]) -> bytes:
    """The PNG bytes of the comparison plot (a placeholder figure when nothing was measured)."""
    from matplotlib import rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("host_uss_bytes", MiB, "host memory, sum of USS (MiB)", "host memory")]
    if series(comparison, "device_bytes"):
        panels.append(("device_bytes", MiB, "device memory, NVML (MiB)", "device memory"))
    panels.append(("throughput_rps", 1.0, "throughput (req/s)", "throughput"))
    with rc_context({"font.size": 10, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
                     "grid.alpha": 0.3, "legend.frameon": False}):
        fig = Figure(figsize=(4.2 * len(panels), 4.6), dpi=110, layout="constrained")
        FigureCanvasAgg(fig)
        verdict = str(comparison.get("verdict") or "threads versus processes")
        fig.suptitle(textwrap.fill(verdict, 40 * len(panels)), fontsize=11, x=0.01, ha="left")
        counts = sorted({r.get("predictors") for r in comparison.get("rows", []) if isinstance(r.get("predictors"), int)})
        for index, (key, scale, label, short) in enumerate(panels, start=1):
            ax = fig.add_subplot(1, len(panels), index)
            data = series(comparison, key, scale)
            if not data:
                ax.text(0.5, 0.5, f"{short} not measured", ha="center", va="center", transform=ax.transAxes,
                        color="#555555")
            for mode, (xs, ys) in data.items():
                color, marker, name = MODE_STYLE[mode]
                ax.plot(xs, ys, color=color, marker=marker, linewidth=2, label=name)
            ax.set_xlabel("predictors (N)")
            ax.set_ylabel(label)
            if counts:
                ax.set_xticks(counts)
            ax.set_ylim(bottom=0)
            ax.set_title(short, loc="left", fontsize=10.5, fontweight="bold")
        handles, labels = fig.axes[0].get_legend_handles_labels()
        if not handles:
            for ax in fig.axes:
                handles, labels = ax.get_legend_handles_labels()
                if handles:
                    break
        if handles:
            fig.legend(handles, labels, loc="outside lower center", ncol=2)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": "gpuscope"})
    return buf.getvalue()