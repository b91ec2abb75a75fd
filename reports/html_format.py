"""The report's HTML building blocks: escaping (outside text is attacker-controlled), number formats, tables, figures."""
from __future__ import annotations

import base64
import hashlib
import html
import re
import struct
from typing import TYPE_CHECKING, Any

from gpuscope.probes.readings import is_available
from gpuscope.probes.redact import redact_text
from gpuscope.probes.units import format_bytes, format_ms
from gpuscope.record.run import RunRecord
from gpuscope.reports.plotdata import (  # imported lazily
    as_unavailable,
    finite,
    is_live,
)

if TYPE_CHECKING:  # pragma: no cover
    from gpuscope.reports.plots import Plot


def esc(value: Any) -> str:
    """Escape text for HTML content and attribute values (quotes included)."""
    return html.escape(str(value), quote=True)


def _unavailable_text(value: Any) -> str | None:
    missing = as_unavailable(value)
    if missing is not None:
        return str(missing)
    if is_available(value) and not finite(value):
        return "n/a"  # Infinity or NaN: never shown as a number
    return None


def fmt(value: Any, key: str = "") -> str:
    """Plain text for one value (escape the result!). Units from the key's suffix."""
    missing = _unavailable_text(value)
    if missing is not None:
        return missing
    if value is None:
        return "\u2014"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        words = key.split("_")
        if "bytes" in words:
            return format_bytes(value)
        if key.endswith("_pct"):
            return f"{value:.1f} %"
        if "share" in words:  # a fraction (cached_share 0.92), shown as the titles show it
            return f"{value:.1%}"
        if "ms" in words or key in ("p50", "p90", "p99", "max", "mean"):
            return format_ms(value)
        if "rps" in words:
            return f"{value:,.1f} requests/s"
        if key.endswith("_s"):
            return _seconds(value)
        if isinstance(value, float):
            return f"{value:,.4g}"
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v, key) for v in value) if value else "none"
    if isinstance(value, dict):
        # {predictors: figure} maps take their unit from the map's own key (process_gpu_bytes_by_predictors)
        return "; ".join(f"{k}: {fmt(v, key if str(k).isdigit() else str(k))}" for k, v in value.items()) \
            if value else "none"
    return redact_text(str(value))


def _seconds(value: float) -> str:
    """3.2 s, 95.0 s, 9,973 s (2.8 h): never scientific notation."""
    if abs(value) < 10:
        return f"{value:.2f} s"
    if abs(value) < 600:
        return f"{value:.1f} s"
    longer = f"{value / 3600:.1f} h" if abs(value) >= 3600 else f"{value / 60:.1f} min"
    return f"{value:,.0f} s ({longer})"


def e(value: Any, key: str = "") -> str:
    return esc(fmt(value, key))


def _na(value: Any, key: str = "") -> str:
    """A table cell's content: missing values styled as such."""
    text = e(value, key)
    return f'<span class="na">{text}</span>' if _unavailable_text(value) is not None else text


def _png_size(png: bytes) -> tuple[int, int] | None:
    if len(png) >= 24 and png[:8] == b"\x89PNG\r\n\x1a\n":
        width, height = struct.unpack(">II", png[16:24])
        return width, height
    return None


def _inline_code(text: str) -> str:
    """Escape, then show `backticked` spans as code (safe: runs after escaping)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", esc(text))


def csp(css: str) -> str:
    digest = base64.b64encode(hashlib.sha256(css.encode("utf-8")).digest()).decode("ascii")
    return ("default-src 'none'; img-src data:; style-src 'sha256-" + digest + "'; "
            "base-uri 'none'; form-action 'none'")


def _figure(plot: "Plot", caption: str, anchor: str) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    size = _png_size(plot.png)
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    return (f'<figure id="{esc(anchor)}"><img src="data:image/png;base64,{data}" alt="{esc(plot.title)}"{dims}>'
            f"<figcaption>{esc(caption)} (also saved as <code>{esc(plot.name)}</code>)</figcaption></figure>")


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else _na(value)


def _rate(value: Any) -> str:
    if not finite(value):
        return _na(value)
    return f"{value:,.0f}" if value >= 1000 else f"{value:,.1f}"


def _millis(value: Any) -> str:
    if value is None:
        return "&mdash;"
    if not finite(value):
        return _na(value)
    return f"{value:,.0f}" if value >= 1000 else (f"{value:.1f}" if value >= 100 else f"{value:.2f}")


def _share(value: Any) -> str:
    return f"{value:.0%}" if finite(value) else "&mdash;"


def _times(value: Any) -> str:
    return f"{value:.2f}x" if finite(value) else "&mdash;"


def _cores(value: Any) -> str:
    return f"{value:.2f}" if finite(value) else "&mdash;"


def _kv_table(pairs: list[tuple[str, str]]) -> str:
    return ('<div class="scroll"><table><tbody>' + "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>"
                                                           for k, v in pairs) + "</tbody></table></div>")


def _has_steps_section(record: "RunRecord") -> bool:
    return record.mode != "compare" and not is_live(record)  # no predictor sweep: no steps table

