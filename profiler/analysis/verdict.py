"""The comparison of threads and processes: rows, verdict and finding, pure functions of measured rows."""
from __future__ import annotations

from typing import Any

from gpuscope.analysis.findings import least_squares_slope
from gpuscope.probes.readings import NOT_SUPPORTED, Unavailable, is_available, reading_to_json
from gpuscope.probes.units import format_bytes, format_ms
from gpuscope.record.run import Finding

THREADS = "threads"


PROCESSES = "processes"


MODES = (THREADS, PROCESSES)


COMPARE_SCOPE = "compare"




FINDING_CODE = "PROCESSES_VS_THREADS"


SAME_THROUGHPUT = 0.10  # throughputs within 10% count as a tie; memory then decides


PLATEAU_SHARE = 0.05  # the recommended N: the smallest within 5% of the best throughput (as diagnose)


COMPARISON_KEYS = ("rows", "per_extra_predictor", "verdict", "winner", "recommended_predictors", "verdict_at_predictors",
                   "verdict_numbers", "host_memory", "device_memory")


def ok_rows(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    return sorted((r for r in rows if r.get("mode") == mode and not r.get("error") and r.get("requests", 0) > 0),
                  key=lambda r: r["predictors"])


def per_extra_predictor(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Least-squares growth per added predictor, per mode and memory figure (bytes), from the measured rows."""
    out: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        mine = ok_rows(rows, mode)
        entry: dict[str, Any] = {}
        for key in ("host_uss_bytes", "host_pss_bytes", "device_bytes"):
            points = [(r["predictors"], r[key]) for r in mine if is_available(r.get(key))]
            slope = least_squares_slope(points)
            if slope is not None:
                entry[key] = int(round(slope))
            else:
                reasons = [r.get(key) for r in mine if isinstance(r.get(key), Unavailable)]
                entry[key] = reasons[0] if reasons else Unavailable(
                    NOT_SUPPORTED, "needs two predictor counts measured in this mode")
        out[mode] = entry
    return out


def recommended_predictors(rows: list[dict[str, Any]]) -> int | None:
    """The smallest N, measured in both modes, whose better mode is within 5% of the best throughput seen."""
    threads = {r["predictors"]: r for r in ok_rows(rows, THREADS)}
    processes = {r["predictors"]: r for r in ok_rows(rows, PROCESSES)}
    both = sorted(set(threads) & set(processes))
    if not both:
        return None
    best_at = {n: max(threads[n]["throughput_rps"], processes[n]["throughput_rps"]) for n in both}
    best = max(best_at.values())
    return min(n for n in both if best_at[n] >= best * (1 - PLATEAU_SHARE))


def throughput_noise(rows: list[dict[str, Any]]) -> float | None:
    """How far apart the two modes' throughputs are at 1 predictor, where they are the same deployment."""
    t = next((r for r in ok_rows(rows, THREADS) if r["predictors"] == 1), None)
    p = next((r for r in ok_rows(rows, PROCESSES) if r["predictors"] == 1), None)
    if t is None or p is None or max(t["throughput_rps"], p["throughput_rps"]) <= 0:
        return None
    return abs(t["throughput_rps"] - p["throughput_rps"]) / max(t["throughput_rps"], p["throughput_rps"])


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _memory_phrase(n: int, diff: Any, what: str, gpu: bool, model_bytes: int) -> str | None:
    """'2 processes use 151 MiB more host memory than 2 threads: ...', or None when it cannot be said."""
    if not is_available(diff):
        return None
    if diff >= 0:
        cause = (f"{_plural(n, 'CUDA context')} and {_plural(n, 'model copy').replace('copys', 'copies')} instead of one"
                 if gpu and what == "device" else
                 f"{_plural(n, 'interpreter')} with torch and {_plural(n, 'copy').replace('copys', 'copies')} of the "
                 f"{format_bytes(model_bytes)} model instead of one")
        if n == 1:
            return f"1 process uses {format_bytes(diff)} more {what} memory than 1 thread in its own process"
        return f"{n} processes use {format_bytes(diff)} more {what} memory than {n} threads: {cause}"
    return f"{n} processes use {format_bytes(-diff)} less {what} memory than {n} threads"


def _memory_text(diffs: list[tuple[int, str]], side: str) -> str:
    """'151 MiB less host memory' from `side`'s point of view; diffs are processes minus threads."""
    words = []
    for diff, what in diffs:
        fewer = diff >= 0 if side == THREADS else diff < 0
        words.append(f"{format_bytes(abs(diff))} {'less' if fewer else 'more'} {what} memory")
    return " and ".join(words) or "memory not measured"


def verdict(rows: list[dict[str, Any]], gpu: bool, model_bytes: int) -> tuple[str, str | None, dict[str, Any]]:
    """(the verdict sentence, the winning mode or None, the numbers behind it), phrased from the rows."""
    recommended = recommended_predictors(rows)
    if recommended is None:
        return ("no predictor count completed in both modes: nothing to compare", None, {})
    measured = sorted(set(r["predictors"] for r in ok_rows(rows, THREADS)) & set(r["predictors"] for r in ok_rows(rows, PROCESSES)))
    # at 1 predictor both modes are the same deployment (one process, one model): judge at 2 or more when possible
    n = recommended if recommended >= 2 else next((m for m in measured if m >= 2), recommended)
    if n == 1:
        return ("at 1 predictor both modes are the same deployment (one process, one model): measure 2 or more "
                "predictors to compare threads with processes", None, {"predictors": 1, "recommended_predictors": 1})
    t = next(r for r in ok_rows(rows, THREADS) if r["predictors"] == n)
    p = next(r for r in ok_rows(rows, PROCESSES) if r["predictors"] == n)
    ratio = p["throughput_rps"] / t["throughput_rps"] if t["throughput_rps"] > 0 else float("inf")
    noise = throughput_noise(rows)
    tie = max(SAME_THROUGHPUT, noise or 0.0)
    host_diff = (p["host_uss_bytes"] - t["host_uss_bytes"]
                 if is_available(p["host_uss_bytes"]) and is_available(t["host_uss_bytes"]) else None)
    device_diff = (p["device_bytes"] - t["device_bytes"]
                   if is_available(p["device_bytes"]) and is_available(t["device_bytes"]) else None)
    diffs = [(d, w) for d, w in ((device_diff, "device"), (host_diff, "host")) if d is not None]
    at = f"at {_plural(n, 'predictor')}"
    def p99(first: dict[str, Any], second: dict[str, Any]) -> str:
        return f"p99 {format_ms(first['latency_ms'].get('p99', 0))} vs {format_ms(second['latency_ms'].get('p99', 0))}"

    if ratio > 1 + tie:
        winner = PROCESSES
        text = (f"processes win {at}: {ratio:.2f}x the throughput of threads ({p['throughput_rps']:.1f} vs "
                f"{t['throughput_rps']:.1f} req/s, " + p99(p, t)
                + f") for {_memory_text(diffs, PROCESSES)}")
    elif ratio < 1 / (1 + tie):
        winner = THREADS
        text = (f"threads win {at}: {1 / ratio:.2f}x the throughput of processes ({t['throughput_rps']:.1f} vs "
                f"{p['throughput_rps']:.1f} req/s, " + p99(t, p)
                + f") with {_memory_text(diffs, THREADS)}")
    else:
        winner = THREADS if not diffs or diffs[0][0] >= 0 else PROCESSES
        first, second = (t, p) if winner == THREADS else (p, t)
        same = f"the same throughput within {tie:.0%}" if tie <= SAME_THROUGHPUT else "throughput within this machine's noise"
        text = (f"{winner} win {at}: {same} ({first['throughput_rps']:.1f} vs "
                f"{second['throughput_rps']:.1f} req/s) with {_memory_text(diffs, winner)}")
    if n != recommended:
        text = "1 predictor already gives the best throughput, and at 1 predictor both modes are the same deployment; " + text
    if noise is not None and noise > SAME_THROUGHPUT:
        text += (f" (throughput is noisy here: at 1 predictor, where both modes are the same deployment, it differed "
                 f"by {noise:.0%}, so smaller differences are not counted)")
    numbers = {"predictors": n, "recommended_predictors": recommended,
               "throughput_noise": round(noise, 3) if noise is not None else None, "tie_tolerance": round(tie, 3),
               "throughput_ratio_processes_to_threads": round(ratio, 3),
               "host_uss_diff_bytes": host_diff, "device_diff_bytes": device_diff,
               "threads": {k: t[k] for k in ("throughput_rps", "latency_ms", "host_uss_bytes", "device_bytes")},
               "processes": {k: p[k] for k in ("throughput_rps", "latency_ms", "host_uss_bytes", "device_bytes")}}
    return text, winner, numbers


def comparison_findings(comparison: dict[str, Any], gpu: bool, model_bytes: int) -> list[Finding]:
    """PROCESSES_VS_THREADS: what N processes cost over N threads, and which mode serves better."""
    rows = comparison.get("rows", [])
    findings: list[Finding] = []
    n = comparison.get("recommended_predictors")
    numbers = comparison.get("verdict_numbers") or {}
    if n is not None and numbers.get("threads"):
        # the count the verdict speaks of, so the finding and the verdict never describe different deployments
        at_n = int(numbers.get("predictors") or n)
        t = next(r for r in ok_rows(rows, THREADS) if r["predictors"] == at_n)
        p = next(r for r in ok_rows(rows, PROCESSES) if r["predictors"] == at_n)
        device_diff = p["device_bytes"] - t["device_bytes"] if is_available(p["device_bytes"]) and is_available(t["device_bytes"]) else None
        host_diff = p["host_uss_bytes"] - t["host_uss_bytes"] if is_available(p["host_uss_bytes"]) and is_available(t["host_uss_bytes"]) else None
        phrases = [x for x in (_memory_phrase(at_n, device_diff, "device", gpu, model_bytes),
                               _memory_phrase(at_n, host_diff, "host", gpu, model_bytes)) if x]
        title = phrases[0] if phrases else f"{at_n} processes versus {at_n} threads: memory not measured"
        per_extra = comparison.get("per_extra_predictor", {})
        winner = comparison.get("winner")
        faster = numbers.get("throughput_ratio_processes_to_threads", 1) > 1 + numbers.get("tie_tolerance", SAME_THROUGHPUT)
        one_is_best = numbers.get("recommended_predictors") == 1  # at 1 predictor both modes are one deployment
        severity = "warn" if winner == PROCESSES and faster and not one_is_best else "info"
        if winner == PROCESSES and faster:
            remedy = ("threads leave throughput on the table here (the GIL or a lock in the model serialises them): "
                      "serve from worker processes if their memory fits, or make forward release the GIL "
                      "(TorchScript / torch.compile, fewer Python-level ops) and compare again"
                      + ("; but 1 predictor already gives the best throughput, where the two modes are the same"
                         if one_is_best else ""))
        elif winner == PROCESSES:
            remedy = ("the two modes serve the same here, and the processes measured less memory, which is unusual "
                      "(threads share one model; each process loads its own): measure again, longer, before "
                      "choosing; threads stay the simpler deployment")
        else:
            remedy = ("serve from threads sharing one model; worker processes only add memory here "
                      f"(each extra process costs {_fmt(per_extra.get(PROCESSES, {}).get('device_bytes' if gpu else 'host_uss_bytes'))}"
                      f" against {_fmt(per_extra.get(THREADS, {}).get('device_bytes' if gpu else 'host_uss_bytes'))} per extra thread)")
        findings.append(Finding(FINDING_CODE, severity, title,
                                reading_to_json({"at_predictors": at_n, "phrases": phrases,
                                                 "verdict": comparison.get("verdict"),
                                                 "per_extra_predictor": per_extra, "verdict_numbers": numbers,
                                                 "host_uss_diff_bytes": host_diff, "device_diff_bytes": device_diff}),
                                remedy, at_n))
    for row in rows:
        if row.get("error"):
            findings.append(Finding(FINDING_CODE, "warn",
                                    f"{_plural(row['predictors'], 'predictor')} in {row['mode']} mode could not run: "
                                    f"{row['error']}", {"row": reading_to_json(row)},
                                    "see the worker's error; on a GPU, N processes need N CUDA contexts and N model "
                                    "copies, which may not fit where N threads do", row["predictors"]))
    return findings


def build_comparison(rows: list[dict[str, Any]], gpu: bool, model_bytes: int) -> dict[str, Any]:
    text, winner, numbers = verdict(rows, gpu, model_bytes)
    return reading_to_json({
        "rows": rows, "per_extra_predictor": per_extra_predictor(rows), "verdict": text, "winner": winner,
        "recommended_predictors": numbers.get("recommended_predictors"), "verdict_at_predictors": numbers.get("predictors"),
        "verdict_numbers": numbers,
        "host_memory": "peak during the measured window of the sum of USS (and PSS) over the workers of the mode "
                       "and their descendants, each process once; the orchestrating parent is not counted",
        "device_memory": ("peak of NVML per-process used memory summed over the workers' pids (a row whose "
                          "device_source is device_delta could not see their pids, e.g. from a container: there it is "
                          "the device's growth since the mode started)" if gpu
                          else "not measured: no GPU (NVML unavailable)"),
    })


def _fmt(value: Any) -> str:
    """A signed size for the verdict's numbers ("+64 MiB"), or n/a for a reading not taken."""
    return ("+" if value >= 0 else "") + format_bytes(value) if is_available(value) else "n/a"
