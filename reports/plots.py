"""The PNG plots of a run: memory breakdown, memory over time, throughput and latency (a diagnose
sweep); memory over time and the breakdown at its peak (a watch or in-process profile); compare.png
(a compare, drawn by reports/compare_plot.py).

Rendered with matplotlib's Agg canvas on a bare `Figure` (no pyplot, no global
backend switch, no display), with style settings scoped by `rc_context`, so a
host application that imported gpuscope keeps its own matplotlib state.
matplotlib and numpy are imported inside functions: the CLI must start fast.

The data preparation (layers per step, layers per tick, min/max downsampling)
is separate from the drawing and testable without matplotlib.
"""
from __future__ import annotations

import io
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gpuscope.probes import scopes
from gpuscope.probes.units import MiB, format_bytes, format_ms
from gpuscope.record.layers import LAYER_LABELS
from gpuscope.reports.plotdata import (
    PROCESS_KEYS,
    TimelineLayers,
    _bytes_per_extra_predictor,
    _recommended,
    byte_unit,
    capacity_bytes,
    finding_moments,
    finite,
    is_live,
    layer_order,
    missing_reason,
    predictors,
    predictors_axis_label,
    profiled_pid,
    step_layers,
    step_spans,
    timeline_layers,
)

if TYPE_CHECKING:  # pragma: no cover
    from gpuscope.probes.samplefile import SampleColumns, Timeline
    from gpuscope.record.run import RunRecord, Step


# One colour per layer key, in every plot and in the HTML legend (colour-blind safe, Okabe-Ito based).
LAYER_COLORS = {
    "model_weights_bytes": "#0072B2",
    "activations_bytes": "#56B4E9",
    "allocator_cache_bytes": "#E69F00",
    "outside_allocator_bytes": "#CC79A7",
    "unattributed_process_bytes": "#B8B8B8",
    "other_processes_bytes": "#D55E00",
    "unattributed_device_bytes": "#D9C7A7",
    "driver_reserved_bytes": "#6E6E6E",
    "rest_of_process_bytes": "#009E73",
}


SERIES_COLORS = {
    "capacity": "#000000",
    "uss": "#332288",
    "throughput": "#117733",
    "p50": "#332288",
    "p99": "#882255",
    "recommended": "#DDAA33",
    "oom": "#CC0000",
}


SEVERITY_COLORS = {"fail": "#B00020", "warn": "#B35900", "info": "#3B5B7A"}


FIGSIZE = (10.0, 5.6)


DPI = 110




_RC = {
    "font.size": 10.5,
    "axes.titlesize": 12.5,
    "axes.titleweight": "bold",
    "axes.labelsize": 10.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "text.usetex": False,
    "svg.fonttype": "none",
    # Titles at the top of their axes. matplotlib's automatic placement (None) measures every tick label at
    # each draw to lift a title over decorations on the top side, which these plots never have: the same
    # pixels (tests/test_plots.py), 15% less of a figure's time.
    "axes.titley": 1.0,
}


@dataclass
class Plot:
    """A rendered plot: its file name, PNG bytes and its title (the conclusion, reused as alt text);
    `notes`: what the report should say about how it was drawn (that the timeline was downsampled)."""

    name: str
    png: bytes
    title: str
    notes: list[str] = field(default_factory=list)


def _wrap(text: str, width: int = 86) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def _safe(text: Any) -> str:
    """Outside text shown in a plot: no mathtext (`$`) interpretation, bounded length."""
    text = str(text)
    if len(text) > 60:
        text = text[:57] + "..."
    return text.replace("$", r"\$")


def _fmt_rps(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def _new_figure() -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    """The figure as PNG bytes: the bytes `fig.savefig(format="png", dpi=DPI)` gives, in one draw.

    savefig draws a figure with a layout engine twice (once without rendering, to lay it out, then for
    real); at the figure's own dpi one draw, which lays it out first, gives the same pixels (tests/
    test_plots.py), and then the PNG is written as savefig writes it."""
    from matplotlib.image import imsave

    buf = io.BytesIO()
    with warnings.catch_warnings():  # odd data (a damaged samples file) can squeeze the axes: draw anyway, quietly
        warnings.filterwarnings("ignore", message=".*constrained_layout not applied", category=UserWarning)
        fig.canvas.draw()
    imsave(buf, fig.canvas.buffer_rgba(), format="png", origin="upper", dpi=fig.dpi,
           metadata={"Software": "gpuscope"})
    return buf.getvalue()


def _placeholder(fig: Any, title: str, message: str) -> None:
    ax = fig.add_subplot(1, 1, 1)
    ax.set_axis_off()
    ax.set_title(_wrap(title), loc="left")
    ax.text(0.5, 0.5, _wrap(message, 70), ha="center", va="center", fontsize=12, color="#555555",
            transform=ax.transAxes)


def _legend_below(fig: Any, ax: Any, ncol: int = 3, extra: list[Any] | None = None) -> None:
    handles, labels = ax.get_legend_handles_labels()
    for artist in extra or []:
        handles.append(artist)
        labels.append(artist.get_label())
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=ncol)


def _off_scale_note(ax: Any, record: "RunRecord", capacity: float) -> None:
    what = "device" if record.gpu else "host"
    ax.text(0.0, -0.11, f"{what} capacity {format_bytes(capacity)} is far above the plot (not to scale)",
            transform=ax.transAxes, ha="left", va="top", fontsize=8.5, color="#555555")


def memory_breakdown_png(record: "RunRecord", tl: TimelineLayers | None = None) -> Plot:
    """Stacked bars of the layers at each predictor count's peak, the device capacity as a line."""
    import matplotlib

    with matplotlib.rc_context(_RC):
        fig = _new_figure()
        title, drew = _draw_breakdown(fig, record, tl)
        if not drew:
            fig.clf()
            _placeholder(fig, title, "No memory readings: the run ended before a step was measured "
                         "and the samples file holds no memory readings.")
        return Plot("memory_breakdown.png", _png(fig), title)


def _draw_breakdown(fig: Any, record: "RunRecord", tl: TimelineLayers | None) -> tuple[str, bool]:
    keys = layer_order(record)
    recommended = _recommended(record)
    bars: list[tuple[str, dict[str, int], str, Any]] = []  # label, layers, missing reason, uss
    for step in record.steps:
        layers = step_layers(record, step)
        memory = step.memory or {}
        reason = "" if layers else missing_reason(memory, ("process_gpu_bytes", "torch_reserved_bytes", "rss_bytes")
                                                 if record.gpu else ("rss_bytes",))
        label = f"{step.predictors}" + (" \u2605" if step.predictors == recommended else "") + ("\n(OOM)" if step.oom else "")
        bars.append((label, layers, reason, memory.get("uss_bytes") if not record.gpu else None))
    by_peak = False
    if not bars and tl is not None and tl.keys:
        peak = tl.extras.get("peak_layers", {})
        bars.append((f"peak at {tl.peak_t_s / tl.unit_t[1]:.1f} {tl.unit_t[0]}", {k: int(v) for k, v in peak.items()},
                     "", None))
        last = {k: int(tl.layers[k][-1]) for k in tl.keys}
        bars.append(("end of run", last, "", None))
        by_peak = True
    if not bars:
        return ("Memory breakdown: nothing was measured", False)
    if not any(layers for _l, layers, _r, _u in bars):
        reasons = sorted({reason for _l, _layers, reason, _u in bars})
        title = "Memory breakdown: no memory figure could be read at any step"
        _placeholder(fig, title, "Memory readings were " + "; ".join(reasons) + ".")
        return title, True
    totals = [sum(layers.values()) for _l, layers, _r, _u in bars]
    capacity = capacity_bytes(record)
    top = max(totals) if totals else 0
    unit, scale = byte_unit(max(top, 1))
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(len(bars)))
    bottoms = [0.0] * len(bars)
    for key in keys:
        heights = [layers.get(key, 0) / scale for _l, layers, _r, _u in bars]
        if not any(heights):
            continue
        ax.bar(x, heights, bottom=bottoms, width=0.62, color=LAYER_COLORS.get(key, "#999999"),
               label=LAYER_LABELS.get(key, key), edgecolor="white", linewidth=0.6)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    headroom_ylim = top / scale * 1.18 if top else 1.0
    uss_labelled = False
    for xi, (total, (_l, layers, reason, uss)) in enumerate(zip(totals, bars)):
        if layers:
            ax.annotate(format_bytes(total), (xi, total / scale), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=9)
        else:
            ax.text(xi, headroom_ylim * 0.05, _wrap(reason, 22), ha="center", va="bottom", fontsize=8.5,
                    color="#8a1c1c", rotation=0)
        if finite(uss):
            ax.plot([xi], [uss / scale], marker="D", color=SERIES_COLORS["uss"], markersize=6, linestyle="none",
                    label=None if uss_labelled else "USS (memory private to the process)")
            uss_labelled = True
    ymax = headroom_ylim
    if capacity:
        if capacity <= 3 * max(top, 1):
            ax.axhline(capacity / scale, color=SERIES_COLORS["capacity"], linestyle="--", linewidth=1.3,
                       label=f"{'device' if record.gpu else 'host'} capacity ({format_bytes(capacity)})")
            ymax = max(ymax, capacity / scale * 1.08)
        else:
            _off_scale_note(ax, record, capacity)
    ax.set_ylim(0, ymax)
    ax.set_xlim(-0.6, len(bars) - 0.4)
    ax.set_xticks(x, [b[0] for b in bars])
    starred = recommended is not None and any(s.predictors == recommended for s in record.steps)
    ax.set_xlabel(predictors_axis_label(record, starred) if not by_peak else "moment of the run")
    ax.set_ylabel(f"memory ({unit})")
    ax.grid(axis="x", visible=False)
    title = _breakdown_title(record, bars, totals, capacity)
    ax.set_title(_wrap(title), loc="left")
    _legend_below(fig, ax, ncol=3 if record.gpu else 3)
    return title, True


def _breakdown_title(record: "RunRecord", bars: list[Any], totals: list[int], capacity: float | None) -> str:
    measured = [(label, total) for (label, layers, _r, _u), total in zip(bars, totals) if layers]
    if not measured:
        return "Memory breakdown: no memory figure could be read (see the reasons on the bars)"
    label, peak = max(measured, key=lambda p: p[1])
    label = label.split("\n")[0].replace(" \u2605", "")
    what = "device memory" if record.gpu else "resident memory (RSS)"
    where = f"at {predictors(int(label))}" if label.isdigit() else \
        (label.replace("peak at", "at") + " into the run" if label.startswith("peak at") else f"at the {label}")
    text = f"Peak {what} {format_bytes(peak)} {where}"
    if capacity and record.gpu:
        text += f" ({peak / capacity:.0%} of {format_bytes(capacity)})"
    slope = _bytes_per_extra_predictor(record)
    if slope is not None:
        text += f"; each extra predictor adds {format_bytes(slope)}" if slope >= MiB / 2 else \
            "; extra predictors add no memory"
    # The weights' share where the user would run: the recommended count, else the largest count that fit.
    fitted = {s.predictors: layers for s in record.steps if not s.oom and (layers := step_layers(record, s))}
    focus = _recommended(record) if _recommended(record) in fitted else \
        max(fitted, key=lambda n: sum(fitted[n].values()), default=None)
    if focus is not None:
        layers = fitted[focus]
        own = sum(v for k, v in layers.items() if k in PROCESS_KEYS)
        weights = layers.get("model_weights_bytes", 0)
        if "unattributed_device_bytes" in layers:  # the device-level fallback: this process's total is unknown
            text += "; NVML lists no process here, so this process's own total is unknown"
        elif weights and own:
            text += f"; model weights are {weights / own:.0%} of this process at {predictors(focus)}"
    return text


def memory_timeline_png(record: "RunRecord", tl: TimelineLayers | None,
                        timeline: "Timeline | SampleColumns | None" = None,
                        note: str = "") -> Plot:
    """The layers as a stacked area over the run, steps shaded and findings' moments annotated."""
    import matplotlib

    with matplotlib.rc_context(_RC):
        fig = _new_figure()
        if tl is None or not tl.keys:
            title = "Memory over time: no samples to plot"
            reason = note or (tl.note if tl is not None else "") or "no samples file was found for this run"
            _placeholder(fig, title, reason[0].upper() + reason[1:] + ".")
            return Plot("memory_timeline.png", _png(fig), title)
        title = _draw_timeline(fig, record, tl, timeline)
        note = tl.downsample_note()
        return Plot("memory_timeline.png", _png(fig), title, [note] if note else [])


def _draw_timeline(fig: Any, record: "RunRecord", tl: TimelineLayers,
                   timeline: "Timeline | SampleColumns | None") -> str:
    import numpy as np

    unit_t, tscale = tl.unit_t
    unit, scale = byte_unit(tl.peak_total)
    ax = fig.add_subplot(1, 1, 1)
    t = tl.t_s / tscale
    stack = [tl.layers[k] / scale for k in tl.keys]
    ax.stackplot(t, *stack, colors=[LAYER_COLORS.get(k, "#999999") for k in tl.keys],
                 labels=[LAYER_LABELS.get(k, k) for k in tl.keys], linewidth=0, step=None, alpha=0.95)
    total = np.sum(np.vstack(stack), axis=0)
    if tl.envelope is not None:
        # every bucket's lowest and highest total: a one-tick spike is a bucket's highest, drawn at any width
        env_t, low, high = tl.envelope
        ax.fill_between(env_t / tscale, low / scale, high / scale, step="post", color="#1b1b1b", alpha=0.22,
                        linewidth=0, label=f"total, min-max of each {tl.bucket_ticks:,} ticks (spikes kept)")
        ax.step(env_t / tscale, high / scale, where="post", color="#1b1b1b", linewidth=0.6)
    else:
        ax.plot(t, total, color="#1b1b1b", linewidth=0.6, label="total (every tick)")
    ytop = tl.peak_total / scale * 1.45
    if tl.uss is not None:
        # USS is read on a slower cadence: a dot where it was read, nothing in between
        pid = profiled_pid(record, timeline)
        every = timeline.cadence_s.get((scopes.process(pid), "uss_bytes")) if timeline is not None and pid else None
        ax.plot(tl.uss_t_s / tscale, tl.uss / scale, color=SERIES_COLORS["uss"], marker=".", markersize=3,
                linestyle="none", label="USS (memory private to the process)"
                + (f", read every {every:g} s" if every else ", where read"))
    if tl.capacity_bytes and tl.capacity_bytes <= 3 * tl.peak_total:
        ax.axhline(tl.capacity_bytes / scale, color=SERIES_COLORS["capacity"], linestyle="--", linewidth=1.3,
                   label=f"{'device' if record.gpu else 'host'} capacity ({format_bytes(tl.capacity_bytes)})")
        ytop = max(ytop, tl.capacity_bytes / scale * 1.08)
    elif tl.capacity_bytes:
        _off_scale_note(ax, record, tl.capacity_bytes)
    ax.set_ylim(0, ytop)
    t_end = float(np.max(tl.t_s)) if len(tl.t_s) else 0.0
    t_start = min(0.0, float(np.min(tl.t_s))) if len(tl.t_s) else 0.0
    stop_t, samples_end = tl.extras.get("readings_stop_t_s"), tl.extras.get("samples_end_t_s")
    if finite(stop_t) and finite(samples_end) and samples_end > t_end:
        t_end = samples_end
    x_end = t_end if t_end > t_start else t_start + 1.0  # a single tick: a one-second axis, not a zero-width one
    # Steps and findings outside the samples (a run killed early, a damaged samples file) are not drawn: a label
    # placed far outside the axes breaks the layout.
    spans = [(max(a, t_start), min(b, x_end), n) for a, b, n in step_spans(record, timeline)
             if b > t_start and a < x_end]
    for i, (a, b, n) in enumerate(spans):
        ax.axvspan(a / tscale, b / tscale, ymin=0.935, ymax=1.0, color="#000000", alpha=0.10 if i % 2 == 0 else 0.05,
                   linewidth=0)
        ax.axvline(a / tscale, color="#444444", linewidth=0.7, linestyle=":")
        ax.axvline(b / tscale, color="#444444", linewidth=0.7, linestyle=":")
        ax.text((a + b) / 2 / tscale, 0.995, f"n={n}", transform=ax.get_xaxis_transform(), ha="center",
                va="top", fontsize=9, color="#222222", fontweight="bold")
    extra = []
    from matplotlib.patches import Patch

    if spans:
        extra.append(Patch(facecolor="#d9d9d9", edgecolor="#444444", linestyle=":",
                           label="sweep step (n = predictors, top band)"))
    if finite(stop_t) and finite(samples_end):
        ax.axvspan(stop_t / tscale, max(samples_end, stop_t) / tscale, ymin=0, ymax=0.93, facecolor="none",
                   edgecolor="#8a1c1c", hatch="//", linewidth=0, alpha=0.5)
        ax.axvline(stop_t / tscale, color="#8a1c1c", linewidth=1.2)
        ax.annotate("memory readings stop", (stop_t / tscale, 0.5), xycoords=("data", "axes fraction"),
                    xytext=(-4, 0), textcoords="offset points", ha="right", fontsize=8.5, color="#8a1c1c",
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.9})
        extra.append(Patch(facecolor="none", edgecolor="#8a1c1c", hatch="//",
                           label="no memory readings (see the findings)"))
    moments = [(t, f) for t, f in finding_moments(record, step_spans(record, timeline)) if t_start <= t <= x_end]
    per_time: dict[float, int] = {}
    for t_s, finding in sorted(moments, key=lambda m: m[0]):
        slot = per_time.get(round(t_s, 3), 0)
        per_time[round(t_s, 3)] = slot + 1
        color = SEVERITY_COLORS.get(finding.severity, "#333333")
        x = t_s / tscale
        ax.axvline(x, color=color, linewidth=1.0, linestyle="--", alpha=0.8)
        ax.annotate(_safe(finding.code), (x, 0.90 - 0.065 * slot), xycoords=("data", "axes fraction"),
                    xytext=(3, 0), textcoords="offset points", fontsize=8, color=color, fontweight="bold",
                    va="top", bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": color, "lw": 0.6,
                                    "alpha": 0.9})
    peak_x = tl.peak_t_s / tscale
    ax.annotate(f"peak {format_bytes(tl.peak_total)}", (peak_x, tl.peak_total / scale), xytext=(0, 12),
                textcoords="offset points", ha="center", fontsize=9,
                arrowprops={"arrowstyle": "-|>", "color": "#222222", "lw": 0.8})
    ax.set_xlim(t_start / tscale, x_end / tscale)
    ax.set_xlabel(f"time since start ({unit_t})")
    ax.set_ylabel(f"memory ({unit})")
    duration = f"{t_end / tscale:.1f} {unit_t}" if unit_t != "s" or t_end < 10 else f"{t_end:.0f} s"
    peak_layers = tl.extras.get("peak_layers", {})
    biggest = max(peak_layers, key=peak_layers.get) if peak_layers else None
    what = "device memory" if record.gpu else "resident memory (RSS)"
    title = f"Over {duration}, {what} peaked at {format_bytes(tl.peak_total)} ({tl.peak_t_s / tscale:.1f} {unit_t} in)"
    if biggest:
        title += f"; largest layer then: {LAYER_LABELS.get(biggest, biggest).split(' (')[0]} " \
                 f"({format_bytes(peak_layers[biggest])})"
    ax.set_title(_wrap(title), loc="left")
    if tl.downsampled:
        ax.text(1.0, -0.11, f"downsampled: {tl.ticks:,} ticks in buckets of {tl.bucket_ticks:,} "
                "(min/max envelope and every layer's peak kept)",
                transform=ax.transAxes, ha="right", va="top", fontsize=8, color="#555555")
    _legend_below(fig, ax, ncol=3, extra=extra)
    return title


def throughput_latency_png(record: "RunRecord") -> Plot:
    """Throughput and p50/p99 latency against predictor count, the recommended count marked."""
    import matplotlib

    with matplotlib.rc_context(_RC):
        fig = _new_figure()
        steps = [s for s in record.steps]
        if not steps:
            title = "Throughput and latency: no step of the sweep completed"
            _placeholder(fig, title, "The run ended before any predictor count was measured"
                         + (f" ({record.status})." if record.status != "complete" else "."))
            return Plot("throughput_latency.png", _png(fig), title)
        if not any(finite(s.throughput_rps) and s.throughput_rps > 0 for s in steps):
            title = "Throughput and latency: no request completed at any predictor count"
            errors = sum(s.errors for s in steps if isinstance(s.errors, int))
            _placeholder(fig, title, f"{errors:,} requests failed across {len(steps)} steps; "
                         "see the errors in the steps table.")
            return Plot("throughput_latency.png", _png(fig), title)
        title = _draw_throughput(fig, record, steps)
        return Plot("throughput_latency.png", _png(fig), title)


def _draw_throughput(fig: Any, record: "RunRecord", steps: list["Step"]) -> str:
    ax = fig.add_subplot(1, 1, 1)
    ax2 = ax.twinx()
    ax2.spines["right"].set_visible(True)
    ax2.grid(False)
    xs = [s.predictors for s in steps]
    # a step that ran out of memory served nothing measurable: a gap in the line (the OOM marker shows it), not a 0
    thr = [float(s.throughput_rps) if finite(s.throughput_rps) and not (s.oom and not s.requests) else float("nan")
           for s in steps]
    ax.plot(xs, thr, color=SERIES_COLORS["throughput"], marker="o", linewidth=2.2, label="throughput (requests/s)")
    for s in steps:
        if finite(s.throughput_rps) and s.throughput_rps > 0:
            ax.annotate(_fmt_rps(s.throughput_rps), (s.predictors, s.throughput_rps), xytext=(0, -16),
                        textcoords="offset points", ha="center", fontsize=8.5, color=SERIES_COLORS["throughput"],
                        bbox={"boxstyle": "round,pad=0.12", "fc": "white", "ec": "none", "alpha": 0.85}, zorder=5)
    for pct, style in (("p50", "-"), ("p99", "--")):
        ys = [float(s.latency_ms.get(pct)) if finite((s.latency_ms or {}).get(pct)) else float("nan")
              for s in steps]
        ax2.plot(xs, ys, color=SERIES_COLORS[pct], marker="s", markersize=4.5, linestyle=style, linewidth=1.6,
                 label=f"{pct} latency (ms)")
    if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(s.level) if s.observed and s.level else str(s.predictors) for s in steps])
    for s in steps:
        if s.too_few_requests:  # shown, not used: the recommendation and the plateau ignore it
            ax.annotate(f"only {s.requests} requests:\nnot used", (s.predictors, 0), xytext=(0, 22),
                        textcoords="offset points", ha="center", fontsize=8, color="#666666",
                        xycoords=("data", "axes fraction"))
    ax.minorticks_off()
    rec = (record.recommendation or {}).get("predictors")
    if isinstance(rec, int) and not isinstance(rec, bool):
        ax.axvline(rec, color=SERIES_COLORS["recommended"], linewidth=7, alpha=0.35, zorder=0,
                   label=f"recommended: {predictors(rec)}")
    oom = [s for s in steps if s.oom]
    for s in oom:
        ax.plot([s.predictors], [0], marker="X", markersize=11, color=SERIES_COLORS["oom"], linestyle="none",
                clip_on=False, label="out of memory" if s is oom[0] else None)
    for s in steps:
        if s.error_rate > 0:  # above an OOM marker, not on it
            ax.annotate(f"{s.error_rate:.1%} errors", (s.predictors, 0), xytext=(0, 16 if s.oom else 4),
                        textcoords="offset points", ha="center", fontsize=8, color=SERIES_COLORS["oom"],
                        xycoords=("data", "axes fraction"))
    measured = [v for v in thr if v == v]
    ax.set_ylim(0, (max(measured) if measured else 1.0) * 1.2 or 1.0)
    lat_values = [float(s.latency_ms.get(p)) for s in steps for p in ("p50", "p99")
                  if finite((s.latency_ms or {}).get(p))]
    ax2.set_ylim(0, (max(lat_values) if lat_values else 1.0) * 1.2 or 1.0)
    ax.set_xlabel(predictors_axis_label(record))
    ax.set_ylabel("throughput (requests/s)", color=SERIES_COLORS["throughput"])
    ax2.set_ylabel("latency (ms)")
    title = _throughput_title(record, steps, rec)
    ax.set_title(_wrap(title), loc="left")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    fig.legend(h1 + h2, l1 + l2, loc="outside lower center", ncol=4)
    return title


def _throughput_title(record: "RunRecord", steps: list["Step"], rec: Any) -> str:
    measured = [s for s in steps if finite(s.throughput_rps) and s.throughput_rps > 0]
    if not measured:
        return "Throughput and latency: no request completed"
    best = max(measured, key=lambda s: s.throughput_rps)
    chosen = record.step_at(rec) if isinstance(rec, int) else None
    if chosen is not None and finite(chosen.throughput_rps):
        p99 = (chosen.latency_ms or {}).get("p99")
        text = (f"Run {predictors(rec)}: {_fmt_rps(chosen.throughput_rps)} requests/s at p99 {format_ms(p99)}")
        if best.predictors != chosen.predictors:
            gain = best.throughput_rps / chosen.throughput_rps - 1 if chosen.throughput_rps else 0.0
            best_p99 = (best.latency_ms or {}).get("p99")
            text += (f"; {best.predictors} give{'s' if best.predictors == 1 else ''} only {gain:+.0%} throughput "
                     f"for p99 {format_ms(best_p99)}")
        return text
    p99 = (best.latency_ms or {}).get("p99")
    return f"Best throughput {_fmt_rps(best.throughput_rps)} requests/s at {predictors(best.predictors)} " \
           f"(p99 {format_ms(p99)})"


def comparison_plot(record: "RunRecord") -> Plot | None:
    """compare.png of a `gpuscope compare` record, None when it compared nothing or could not be drawn."""
    comp = record.extra.get("comparison") if isinstance(record.extra, dict) else None
    if not isinstance(comp, dict) or not comp.get("rows"):
        return None
    try:
        from gpuscope.reports.compare_plot import compare_png

        return Plot("compare.png", compare_png(comp), str(comp.get("verdict") or "threads versus processes"))
    except Exception:  # a report without this figure beats no report
        return None


def render_plots(record: "RunRecord", timeline: "Timeline | SampleColumns | None", note: str = "") -> list[Plot]:
    """The plots of a run, in the report's order; which ones depends on record.mode:

    - diagnose (a predictor sweep): memory breakdown per predictor count, memory over time,
      throughput and latency;
    - watch / profile (no sweep): memory over time, then the breakdown at its peak and at the
      end (when the samples hold memory readings); no throughput plot, as nothing was swept;
    - compare: compare.png (threads versus processes), nothing when no row was measured.

    A SampleColumns `timeline` is read here, once (by timeline_layers, before anything else asks it).
    """
    if record.mode == "compare":
        plot = comparison_plot(record)
        return [plot] if plot is not None else []
    tl = timeline_layers(record, timeline)
    if is_live(record):
        plots = [memory_timeline_png(record, tl, timeline, note)]
        if tl is not None and tl.keys:
            plots.append(memory_breakdown_png(record, tl))
        if record.steps:  # requests marked with gpuscope.request: the curve of the observed levels
            plots.append(throughput_latency_png(record))
        return plots
    return [memory_breakdown_png(record, tl), memory_timeline_png(record, tl, timeline, note),
            throughput_latency_png(record)]
