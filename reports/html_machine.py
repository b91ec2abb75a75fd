"""The report's machine side: processes and engines on each device (pods, containers), environment, configuration.

Process names, command lines and environments are outside text: escaped, and secrets redacted, here.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from gpuscope.probes.redact import REDACTED, is_secret_name, redact_cmdline, redact_env, redact_text
from gpuscope.reports.html_format import _kv_table, _na, _unavailable_text, e, esc, fmt

if TYPE_CHECKING:  # pragma: no cover
    from gpuscope.record.run import RunRecord


def _engines_cell(value: Any) -> str:
    missing = _unavailable_text(value)
    if missing is not None:
        return f'<span class="na">{esc(missing)}</span>'
    if isinstance(value, (list, tuple)):
        return esc(", ".join(str(v) for v in value)) if value else '<span class="muted">none</span>'
    return e(value)


def _cmdline_cell(value: Any) -> str:
    missing = _unavailable_text(value)
    if missing is not None:
        return f'<span class="na">{esc(missing)}</span>'
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value)
    return esc(redact_text(redact_cmdline(str(value))))


def _env_cell(value: Any) -> str:
    missing = _unavailable_text(value)
    if missing is not None:
        return f'<span class="na">{esc(missing)}</span>'
    if isinstance(value, dict):
        if not value:
            return '<span class="muted">none set</span>'
        safe = redact_env({str(k): str(v) for k, v in value.items()})
        return "<br>".join(f"<code>{esc(k)}={esc(v)}</code>" for k, v in safe.items())
    return e(value)


def _process_env(p: dict[str, Any]) -> str:
    env = p.get("memory_env")
    if env is None or (isinstance(env, dict) and not env):
        return ""
    return f'<span class="envs">{_env_cell(env)}</span>'


def _pod_line(p: dict[str, Any]) -> str:
    """The Kubernetes pod uid and short container id from /proc/PID/cgroup, where the cgroup named them."""
    named = [(label, p.get(key)[:width]) for label, key, width in (("pod", "pod_uid", 36), ("container", "container_id", 12))
             if isinstance(p.get(key), str)]
    return ('<br><span class="muted">' + esc(", ".join(f"{label} {text}" for label, text in named)) + "</span>"
            if named else "")


def _processes(record: "RunRecord") -> str:
    processes = [p for p in record.processes or [] if isinstance(p, dict)]
    parts = ['<section id="processes"><h2>Processes and engines on each device</h2>']
    groups: dict[Any, list[dict[str, Any]]] = {}
    for p in processes:
        groups.setdefault(p.get("gpu"), []).append(p)
    if not record.gpu and record.device_unavailable:
        du = record.device_unavailable
        parts.append(f"<p>No GPU was used: {e(du.get('reason'))}"
                     + (f" ({e(du.get('detail'))})" if du.get("detail") else "") + ".</p>")
    if not processes:
        parts.append("<p>No process was recorded.</p>")
    devices = {d.get("index"): d for d in record.devices or [] if isinstance(d, dict)}
    for gpu in sorted(groups, key=lambda g: (g is None, g if isinstance(g, int) else 0)):
        if gpu is None:
            parts.append("<h3>Host</h3>")
        else:
            d = devices.get(gpu, {})
            desc = ", ".join(x for x in (fmt(d.get("name")) if d.get("name") is not None else "",
                                         fmt(d.get("total_bytes"), "total_bytes") if d.get("total_bytes") is not None
                                         else "") if x)
            parts.append(f"<h3>GPU {e(gpu)} (NVML index)" + (f" <span class=\"muted\">{esc(desc)}</span>" if desc else "")
                         + "</h3>")
        rows = []
        for p in sorted(groups[gpu], key=lambda p: (not p.get("self"), str(p.get("pid")))):
            flags = []
            if p.get("self"):
                flags.append("this run")
            if p.get("exists") is False:
                flags.append("not in this pid namespace")
            if p.get("gone") and isinstance(p.get("last_seen_s"), (int, float)):
                flags.append(f"left after {p['last_seen_s']:.0f} s")
            rows.append(
                f'<tr><td class="num">{e(p.get("pid"))}</td><td>{e(p.get("name"))}'
                + (f' <span class="muted">({esc(", ".join(flags))})</span>' if flags else "")
                + _pod_line(p) + "</td>"
                f'<td>{_na(p.get("user"))}</td><td class="num">{_na(p.get("peak_used_bytes"), "_bytes")}</td>'
                f'<td>{_engines_cell(p.get("engines"))}{_process_env(p)}</td>'
                f'<td class="cmd">{_cmdline_cell(p.get("cmdline"))}</td></tr>')
        parts.append('<div class="scroll"><table><thead><tr><th class="num">pid</th><th>name</th><th>user</th>'
                     '<th class="num">peak GPU memory</th><th>engines and their memory variables</th>'
                     "<th>command line (secrets redacted)</th></tr></thead><tbody>" + "".join(rows)
                     + "</tbody></table></div>")
    parts.append(_departed_not_listed((getattr(record, "extra", None) or {}).get("departed_processes")))
    parts.append("</section>")
    return "\n".join(parts)


def _departed_not_listed(departed: Any) -> str:
    """The neighbours a long watch saw come and go beyond those listed (record.extra["departed_processes"])."""
    if not isinstance(departed, dict) or not departed.get("not_listed"):
        return ""
    largest = departed.get("largest_not_listed_peak_used_bytes")
    return (f'<p class="muted">{e(departed["not_listed"])} more processes used a GPU and left during the run; '
            f'the {e(departed.get("listed", 0))} departed ones that held the most are listed'
            + (f"; none of the others held more than {fmt(largest, 'used_bytes')}" if largest is not None else "")
            + ".</p>")


def _environment(record: "RunRecord") -> str:
    env = record.environment or {}
    pairs = [(name, _na(env.get(key)) if key in env else '<span class="muted">not recorded</span>')
             for key, name in (("gpuscope", "gpuscope"), ("torch", "torch"), ("cuda", "CUDA"),
                               ("driver", "driver"), ("python", "Python"))]
    for d in record.devices or []:
        if isinstance(d, dict):
            pairs.append((f"GPU {fmt(d.get('index'))} (NVML index)",
                          esc(f"{fmt(d.get('name'))}, {fmt(d.get('total_bytes'), 'total_bytes')}, "
                              f"driver {fmt(d.get('driver'))}, {fmt(d.get('uuid'))}")))
    if not record.gpu:
        du = record.device_unavailable or {}
        pairs.append(("device", esc("CPU" + (f" (no GPU: {fmt(du.get('reason'))}"
                                             + (f", {fmt(du.get('detail'))}" if du.get("detail") else "") + ")"
                                             if du else ""))))
    host = record.host or {}
    for key in ("hostname", "platform", "logical_cores", "usable_cores", "cgroup_cpu_quota", "memory_total_bytes"):
        if key in host:
            pairs.append((f"host {key.replace('_bytes', '').replace('_', ' ')}", _na(host[key], key)))
    for key, value in env.items():
        if key not in ("gpuscope", "torch", "cuda", "driver", "python", "memory_env"):
            pairs.append((str(key), esc("***" if is_secret_name(str(key)) else fmt(value, str(key)))))
    pairs.append(("engines' memory variables", _env_cell(env.get("memory_env", {}))))
    return f'<section id="environment"><h2>Environment</h2>{_kv_table(pairs)}</section>'


def _config_value(key: str, value: Any) -> str:
    if is_secret_name(key) and not isinstance(value, (int, float, bool)) and value is not None:
        return esc(REDACTED)
    if isinstance(value, (dict, list)) and _unavailable_text(value) is None:
        try:
            text = json.dumps(value, default=str, ensure_ascii=False)
        except (TypeError, ValueError):
            text = str(value)
        return f"<code>{esc(redact_text(text))}</code>"
    return _na(value, key)


def _device_match(match: Any) -> str:
    """torch's device as NVML's index, and how it was found: by UUID, or assumed (then the figures may be
    another GPU's: CUDA_VISIBLE_DEVICES reorders devices)."""
    if not isinstance(match, dict) or "nvml_index" not in match:
        return ""
    text = f"torch cuda:{e(match.get('torch_index'))} = NVML device {e(match.get('nvml_index'))}"
    if match.get("matched_by") == "uuid":
        return text + " (matched by UUID)"
    return (f'<strong>{text}, assumed</strong>: {e(match.get("detail") or "the UUIDs did not match")}')


def _configuration(record: "RunRecord") -> str:
    run = [("status", e(record.status)), ("mode", e(record.mode)), ("started at", e(record.started_at)),
           ("ended at", e(record.ended_at)), ("profiled pid", e(record.pid)),
           ("gpuscope (run)", e(record.tool_version)), ("samples file", f"<code>{e(record.samples)}</code>")]
    match = _device_match((record.extra or {}).get("gpu_index"))
    if match:
        run.append(("device match", match))
    config = [(str(k), _config_value(str(k), v)) for k, v in (record.config or {}).items()]
    model = [(str(k), _config_value(str(k), v)) for k, v in (record.model or {}).items()]
    parts = ['<section id="configuration"><h2>Configuration</h2>', "<h3>Run</h3>", _kv_table(run)]
    if config:
        parts += ["<h3>Options</h3>", _kv_table(config)]
    if model:
        parts += ["<h3>Model</h3>", _kv_table(model)]
    if record.sharing:
        parts += ["<h3>Sharing</h3>", _kv_table([(str(k), _config_value(str(k), v))
                                                  for k, v in record.sharing.items()])]
    if record.sampler:
        parts += ["<h3>Sampler</h3>", _kv_table([(str(k), _config_value(str(k), v))
                                                  for k, v in record.sampler.items()])]
    parts.append("</section>")
    return "\n".join(parts)
