"""Remedies verified: a tune run's findings say what their own remedy measured, or that it did not help.

A finding's remedy is advice ("torch.set_num_threads(...)", "set CUBLAS_WORKSPACE_CONFIG=:0:0", "one stream
per predictor"). When `gpuscope tune` searched that very setting, the run holds the measurement, so the
finding quotes it beside the advice: "with 1 intra-op thread: 12.0 req/s vs 10.2 (+18%), p99 200 vs 238 ms".
A pure function of the record's `tuning` block (analysis layer): no measurement happens here.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from gpuscope.probes.units import format_ms
from gpuscope.record.run import Finding, RunRecord

HELPED_SHARE = 0.02  # a change smaller than this is noise on a shared machine: "did not help"
MiB = 1024 * 1024


def _rows(record: RunRecord) -> list[dict[str, Any]]:
    tuning = record.tuning or {}
    return [c for c in tuning.get("configurations") or [] if isinstance(c, dict) and c.get("status") in
            ("measured", "over_limit") and isinstance(c.get("throughput_rps"), (int, float))]


def _same_group(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("intra_op_threads", "streams", "env"))


def _p99(row: dict[str, Any]) -> Any:
    return (row.get("latency_ms") or {}).get("p99")


def _device(row: dict[str, Any]) -> Any:
    return (row.get("memory") or {}).get("device_bytes")


def _throughput_text(label: str, mine: dict[str, Any], base: dict[str, Any]) -> tuple[str, bool]:
    new, old = float(mine["throughput_rps"]), float(base["throughput_rps"])
    gain = new / old - 1 if old > 0 else 0.0
    text = f"with {label}: {new:.1f} req/s vs {old:.1f} ({gain:+.0%})"
    if isinstance(_p99(mine), (int, float)) and isinstance(_p99(base), (int, float)):
        text += f", p99 {format_ms(_p99(mine))} vs {format_ms(_p99(base))}"
    helped = gain > HELPED_SHARE
    return text + ("" if helped else ": it did not help"), helped


def _slope(rows: list[dict[str, Any]]) -> float | None:
    from gpuscope.analysis.findings import least_squares_slope

    points = [(r["settings"]["predictors"], float(_device(r))) for r in rows if isinstance(_device(r), (int, float))]
    return least_squares_slope(points) if len(points) >= 2 else None


def _find(rows: list[dict[str, Any]], want: Callable[[dict[str, Any]], bool], predictors: int) -> dict[str, Any] | None:
    """The measured row of the remedy's settings at `predictors`, else its best at any count."""
    mine = [r for r in rows if want(r["settings"])]
    exact = next((r for r in mine if r["settings"]["predictors"] == predictors), None)
    return exact or max(mine, key=lambda r: r["throughput_rps"], default=None)


def _not_measured(record: RunRecord, want: Callable[[dict[str, Any]], bool]) -> str:
    tuning = record.tuning or {}
    reasons = [c.get("reason") for c in tuning.get("configurations") or []
               if isinstance(c, dict) and want(c.get("settings") or {}) and c.get("reason")]
    return "not measured by this tune" + (f" ({reasons[0]})" if reasons else " (not in its search space)")


def verify_remedies(record: RunRecord, usable_cores: int) -> list[Finding]:
    """The record's findings, each whose remedy was searched carrying `evidence.remedy_measured` and a line
    appended to its remedy. Others are returned unchanged."""
    tuning = record.tuning or {}
    default = (tuning.get("default") or {}).get("settings")
    rows = _rows(record)
    if not isinstance(default, dict) or not rows:
        return list(record.findings)
    n = int(default["predictors"])
    base = next((r for r in rows if r["settings"] == default), None)
    if base is None:
        return list(record.findings)
    default_rows = [r for r in rows if _same_group(r["settings"], default)]
    out: list[Finding] = []
    for finding in record.findings:
        verified: dict[str, Any] | None = None
        if finding.code == "CPU_OVERSUBSCRIPTION" and not record.gpu:
            threads = max(1, usable_cores // n)
            if threads == default["intra_op_threads"]:
                threads = 1
            want = (lambda s, t=threads: s.get("intra_op_threads") == t and not s.get("streams") and not s.get("env"))
            label = f"{threads} intra-op thread{'s' if threads != 1 else ''}"
            verified = _compare_throughput(record, rows, want, n, label, base)
        elif finding.code == "DEFAULT_STREAM_SERIALIZATION":
            want = (lambda s: bool(s.get("streams")) and not s.get("env")
                    and s.get("intra_op_threads") == default["intra_op_threads"])
            verified = _compare_throughput(record, rows, want, n, "a stream per predictor", base)
        elif finding.code in ("PER_PREDICTOR_GROWTH", "OUTSIDE_ALLOCATOR"):
            want = (lambda s: (s.get("env") or {}).get("CUBLAS_WORKSPACE_CONFIG") == ":0:0")
            mine = [r for r in rows if want(r["settings"])]
            new, old = _slope(mine), _slope(default_rows)
            if new is not None and old is not None:
                helped = new < old * (1 - HELPED_SHARE) if old > 0 else False
                text = (f"with CUBLAS_WORKSPACE_CONFIG=:0:0: {max(0.0, new) / MiB:.0f} MiB per extra predictor vs "
                        f"{max(0.0, old) / MiB:.0f}" + ("" if helped else ": it did not help"))
                verified = {"settings": mine[0]["settings"], "text": text, "helped": helped,
                            "bytes_per_extra_predictor": new, "default_bytes_per_extra_predictor": old}
            else:
                verified = {"text": _not_measured(record, want) if not mine else
                            "with CUBLAS_WORKSPACE_CONFIG=:0:0: fewer than two predictor counts measured device "
                            "memory", "helped": None}
        elif finding.code in ("CACHE_BLOAT", "FRAGMENTATION"):
            want = (lambda s: "expandable_segments:True" in str((s.get("env") or {}).get("PYTORCH_CUDA_ALLOC_CONF", "")))
            mine = _find(rows, want, n)
            if mine is not None and isinstance(_device(mine), (int, float)) and isinstance(_device(base), (int, float)):
                helped = _device(mine) < _device(base) * (1 - HELPED_SHARE)
                text = (f"with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True at {mine['settings']['predictors']} "
                        f"predictors: {_device(mine) / MiB:.0f} MiB vs {_device(base) / MiB:.0f}"
                        + ("" if helped else ": it did not help"))
                verified = {"settings": mine["settings"], "text": text, "helped": helped}
            else:
                verified = {"text": _not_measured(record, want), "helped": None}
        if verified is None:
            out.append(finding)
            continue
        remedy = (finding.remedy + " " if finding.remedy else "") + f"Measured by this tune: {verified['text']}."
        out.append(replace(finding, evidence={**finding.evidence, "remedy_measured": verified}, remedy=remedy))
    return out


def _compare_throughput(record: RunRecord, rows: list[dict[str, Any]], want: Callable[[dict[str, Any]], bool],
                        n: int, label: str, base: dict[str, Any]) -> dict[str, Any]:
    mine = _find(rows, want, n)
    if mine is None:
        return {"text": _not_measured(record, want), "helped": None}
    if mine["settings"]["predictors"] != n:
        label += f" at {mine['settings']['predictors']} predictors"
    text, helped = _throughput_text(label, mine, base)
    return {"settings": mine["settings"], "text": text, "helped": helped, "throughput_rps": mine["throughput_rps"],
            "default_throughput_rps": base["throughput_rps"]}
