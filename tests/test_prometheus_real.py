"""deploy/ proven against real parts: a real Prometheus server scrapes `gpuscope export` fed by the
replayed H200, an export with no NVML at all, and a profile(prometheus_port=...) endpoint; every
dashboard query and every alert expression then runs on its HTTP API. promtool checks and unit-tests
the rules; kubernetes-validate checks the DaemonSet against the Kubernetes schema.

Without `prometheus`/`promtool` on PATH the Prometheus tests skip with the reason, unless
GPUSCOPE_REQUIRE_PROMETHEUS=1 (set by .ci/run), which makes them fail instead.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from gpuscope.commands.export import run_export
from gpuscope.inprocess import Profile
from gpuscope.probes.cgroups import parse_cgroup
from gpuscope.probes.nvml import DeviceUnavailable
from gpuscope.probes.processes import ProcessInfo
from gpuscope.probes.readings import NO_DEVICE
from tests.fakes.nvml import ReplayNvml
from tests.fakes.torch_cuda import FakeTorchCuda

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
CGROUP = REPO / "tests" / "fixtures" / "cgroup" / "k8s-v2-systemd-containerd-burstable.cgroup"
DEADLINE_S = 90.0


def _require_prometheus() -> tuple[str, str]:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if prometheus and promtool:
        return prometheus, promtool
    why = "Prometheus is not installed (apt-get install prometheus gives the server and promtool)"
    if os.environ.get("GPUSCOPE_REQUIRE_PROMETHEUS") == "1":
        pytest.fail(f"{why}, and GPUSCOPE_REQUIRE_PROMETHEUS=1 requires it")
    pytest.skip(why)


def _promtool(*args: str, cwd: Path = DEPLOY) -> subprocess.CompletedProcess:
    _, promtool = _require_prometheus()
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------ the files themselves

def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets, and the metric selectors of its variables."""
    board = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        query = var.get("query")
        text = query.get("query") if isinstance(query, dict) else None
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", text or "")
        if match:
            exprs.append(match.group(1))
    return exprs


def concrete(expr: str) -> str:
    """A dashboard expression with Grafana's variables as the dashboard's 'All' would set them."""
    return expr.replace("$node", ".*").replace("$gpu", ".*").replace("$__rate_interval", "1m")


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_checks_and_unit_tests_the_rules():
    checked = _promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in checked.stdout
    tested = _promtool("test", "rules", "alerts.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
    tested_names = set(re.findall(r"alertname: (\w+)", (DEPLOY / "alerts.test.yml").read_text()))
    assert tested_names == {rule["alert"] for rule in alert_rules()}  # every alert has a unit test


def test_promtool_checks_the_scrape_config(tmp_path):
    checked = _promtool("check", "config", "prometheus.yml")
    if checked.returncode != 0 and "field kubernetes_sd_configs not found" in checked.stdout + checked.stderr:
        # Debian's prometheus is built without Kubernetes service discovery: check everything else
        # (the relabelling, the rule file) with the discovery swapped for a static target.
        config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
        for job in config["scrape_configs"]:
            if job.pop("kubernetes_sd_configs", None) is not None:
                job["static_configs"] = [{"targets": ["127.0.0.1:9840"]}]
        shutil.copy(DEPLOY / "alerts.yml", tmp_path / "alerts.yml")
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        checked = _promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout + checked.stderr


def test_the_manifest_validates_against_the_kubernetes_schema():
    import kubernetes_validate

    docs = [d for d in yaml.safe_load_all((DEPLOY / "daemonset.yaml").read_text()) if d]
    assert {d["kind"] for d in docs} == {"Namespace", "DaemonSet"}
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    daemonset = next(d for d in docs if d["kind"] == "DaemonSet")
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["hostPID"] is True and spec["runtimeClassName"] == "nvidia" and spec["nodeSelector"]
    container = spec["containers"][0]
    assert container["ports"][0]["containerPort"] == 9840 and "--bind" in container["args"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "nvidia.com/gpu" not in json.dumps(container.get("resources", {}))  # it takes no GPU from workloads
    broken = copy.deepcopy(daemonset)
    broken["spec"]["template"]["spec"]["hostPID"] = "yes"  # the validator can fail
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30.0", strict=True)


# ------------------------------------------------------------------ a real Prometheus

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(what: str, check: Any, deadline_s: float = DEADLINE_S) -> Any:
    deadline = time.monotonic() + deadline_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as exc:  # not listening yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: last {last!r}")


def _api(base: str, path: str, **params: str) -> dict[str, Any]:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:  # a query that does not parse is a 400 with a JSON body
        body = exc.read()
        try:
            return json.loads(body)
        except ValueError:  # "Service Unavailable" (503) while Prometheus opens its storage: not ready yet
            return {"status": "unavailable", "http_status": exc.code, "body": body[:200].decode("utf-8", "replace")}


def _describer(pid: int, nvml_name: str) -> ProcessInfo:
    ids = parse_cgroup(CGROUP.read_text())  # the replayed server runs in a pod, as on a cluster
    return ProcessInfo(pid, True, nvml_name or "python3", "root", "python3 serve.py", ("torch",), {},
                       ids.pod_uid, ids.container_id)


def _no_nvml() -> Any:
    raise DeviceUnavailable(NO_DEVICE, "NVML could not start: NVML Shared Library Not Found")


class _Export:
    """run_export in a thread on a free port."""

    def __init__(self, **kwargs: Any) -> None:
        self.ready: list[Any] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=run_export, args=(0,), kwargs=dict(
            stop=self.stop, handle_signals=False, on_ready=self.ready.append, err=open(os.devnull, "w"), **kwargs))
        self.thread.start()
        self.exporter = _wait_for("the exporter to listen", lambda: self.ready and self.ready[0], 20)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.exporter.port}"

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A real Prometheus scraping three gpuscope endpoints every second, with deploy/alerts.yml loaded."""
    server, _ = _require_prometheus()
    tmp = tmp_path_factory.mktemp("prometheus")
    node = _Export(opener=ReplayNvml, describe=_describer, pid_exists=lambda p: True)
    bare = _Export(opener=_no_nvml)
    replay = ReplayNvml()  # the profiled process is the H200 timeline's server, renamed to this pid
    target_tick = replay.first_tick_of("4GiB-freed-cached") + 2
    me = os.getpid()
    replay_as_me = ReplayNvml(lines=[dict(line, procs=[dict(p, pid=me) for p in line["procs"]])
                                     for line in replay.lines])
    torch_cuda = FakeTorchCuda.from_timeline(replay_as_me.lines, follow=replay_as_me)
    profile = Profile(out=str(tmp / "profile"), interval=0.01, report=False,
                      nvml_opener=lambda: (replay_as_me, None), torch_cuda=torch_cuda, torch_scopes={0: 0},
                      listeners=[lambda t, v: replay_as_me.tick < target_tick and replay_as_me.advance()],
                      prometheus_port=0).start()
    port = _free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "alerts.yml")],
        "scrape_configs": [
            {"job_name": "gpuscope", "static_configs": [{"targets": [node.target, bare.target]}]},
            {"job_name": "gpuscope-inprocess",
             "static_configs": [{"targets": [f"127.0.0.1:{profile.metrics.port}"]}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp / "prometheus.log", "w")
    proc = subprocess.Popen([server, f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    targets = {"node": node.target, "bare": bare.target, "profile": f"127.0.0.1:{profile.metrics.port}"}
    try:
        def two_scrapes_each() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited {proc.returncode}: {(tmp / 'prometheus.log').read_text()[-2000:]}")
            result = _api(base, "/api/v1/query", query="count_over_time(up[5m]) >= 2 and up == 1")
            seen = {s["metric"]["instance"] for s in result.get("data", {}).get("result", [])}
            return set(targets.values()) <= seen

        _wait_for("two successful scrapes of every target", two_scrapes_each)
        yield {"base": base, "targets": targets, "log": tmp / "prometheus.log", "version": _api(base, "/api/v1/status/buildinfo")}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        profile.stop()
        node.close()
        bare.close()


def test_every_dashboard_query_returns_series(prometheus):
    base = prometheus["base"]
    empty, failed = [], []
    for expr in dashboard_queries():
        answer = _api(base, "/api/v1/query", query=concrete(expr))
        if answer.get("status") != "success":
            failed.append((expr, answer.get("error")))
        elif not answer["data"]["result"]:
            empty.append(expr)
    assert not failed, failed
    assert not empty, empty
    assert len(dashboard_queries()) >= 20


def test_every_alert_expression_evaluates(prometheus):
    base = prometheus["base"]
    for rule in alert_rules():
        answer = _api(base, "/api/v1/query", query=rule["expr"])
        assert answer.get("status") == "success", (rule["alert"], answer)
        assert answer["data"]["resultType"] == "vector", rule["alert"]

    def all_evaluated() -> list[dict[str, Any]]:
        rules = [r for g in _api(base, "/api/v1/rules")["data"]["groups"] for r in g["rules"]]
        done = len(rules) == len(alert_rules()) and all(not r["lastEvaluation"].startswith("0001") for r in rules)
        return rules if done else []

    rules = _wait_for("Prometheus to evaluate every rule", all_evaluated)
    assert {r["name"]: (r["health"], r.get("lastError", "")) for r in rules} == \
        {r["alert"]: ("ok", "") for r in alert_rules()}


def test_what_prometheus_stored_is_what_the_node_looks_like(prometheus):
    base, targets = prometheus["base"], prometheus["targets"]

    def one(query: str) -> list[dict[str, Any]]:
        answer = _api(base, "/api/v1/query", query=query)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    available = {s["metric"]["instance"]: float(s["value"][1]) for s in one("gpuscope_nvml_available")}
    assert available[targets["node"]] == 1 and available[targets["bare"]] == 0
    nvml_alert = next(r["expr"] for r in alert_rules() if r["alert"] == "GpuscopeNvmlUnavailable")
    fired = one(nvml_alert)
    assert [(s["metric"]["instance"], s["metric"]["reason"]) for s in fired] == [(targets["bare"], NO_DEVICE)]
    ids = parse_cgroup(CGROUP.read_text())
    processes = one(f'gpuscope_process_gpu_memory_bytes{{instance="{targets["node"]}"}}')
    assert processes and {s["metric"]["pod_uid"] for s in processes} == {ids.pod_uid}
    assert {s["metric"]["container_id"] for s in processes} == {ids.container_id}
    total = one(f'gpuscope_device_memory_total_bytes{{instance="{targets["node"]}"}}')
    assert float(total[0]["value"][1]) == 150_754_820_096  # the H200 of the replay
    cached = one("gpuscope_allocator_cached_bytes")
    assert cached and cached[0]["metric"]["instance"] == targets["profile"]


def test_the_dashboard_names_only_metrics_gpuscope_exports(prometheus):
    names = set(_api(prometheus["base"], "/api/v1/label/__name__/values")["data"])
    used = {name for expr in dashboard_queries() for name in re.findall(r"\bgpuscope_[a-z_]+\b", expr)}
    used |= {name for rule in alert_rules() for name in re.findall(r"\bgpuscope_[a-z_]+\b", rule["expr"])}
    assert used and used <= names, sorted(used - names)
