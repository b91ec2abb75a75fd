"""Issue 19: a live server's own requests and models, seen by gpuscope.profile().

Concurrency in the server tests is set by the clients and pinned by a barrier inside the model: at a
phase of k clients every request waits until k requests are in flight, so its level (the most in flight
while it ran) is exactly k whatever the machine's load. Nothing here sleeps to arrange concurrency or
decides from timings."""
from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import gpuscope
from gpuscope import request
from gpuscope.analysis import live_traffic
from gpuscope.analysis.gate import evaluate as gate_evaluate
from gpuscope.analysis.limits import Limits
from gpuscope.measure import requests as requests_
from gpuscope.record.run import RunRecord, load_run

ROOT = Path(__file__).resolve().parents[1]


def recipe(name: str) -> str:
    text = (ROOT / "docs" / "live.md").read_text(encoding="utf-8")
    match = re.search(rf"<!-- recipe: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"docs/live.md lost its {name} recipe"
    return match.group(1)


def definitions(name: str) -> dict[str, Any]:
    """A recipe's code up to where it starts serving (its imports, model, handler), executed."""
    code = recipe(name)
    for marker in ("\nserver = ", "\nif __name__ == ", "\nwith gpuscope.profile("):
        if marker in code:
            code = code[:code.index(marker)]
    namespace: dict[str, Any] = {"__name__": f"recipe_{name}"}
    exec(compile(code, f"docs/live.md ({name})", "exec"), namespace)
    return namespace


class Phase:
    """The barrier every request of the current phase waits at inside the model: k clients, k in flight."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(1)

    def set(self, clients: int) -> None:
        self.barrier = threading.Barrier(clients)


def gated_model(phase: Phase) -> Any:
    import torch

    class Gated(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(64, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            phase.barrier.wait(timeout=30)  # all k requests of the phase are in flight here
            return self.linear(x)

    return Gated().eval()


def post(url: str, payload: dict[str, Any]) -> dict[str, Any]:
    data = json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as response:
        return json.loads(response.read())


def run_phases(url: str, phase: Phase, plan: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """(clients, requests per client) per phase; real HTTP clients on threads, one request at a time each."""
    answers: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    for clients, per_client in plan:
        phase.set(clients)

        def client() -> None:
            try:
                for _ in range(per_client):
                    answers.append(post(url, {"inputs": [[0.5] * 64] * 2}))
            except BaseException as exc:  # surfaced below, not lost in a thread
                errors.append(exc)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
    return answers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PLAN = [(1, 24), (2, 12), (4, 6), (8, 1)]  # 24, 24, 24 requests at levels 1, 2, 4; 8 at level 8


def check_curve(record: RunRecord) -> None:
    steps = {s.level: s for s in record.steps}
    assert list(steps) == ["1", "2", "3-4", "5-8"]
    assert all(s.observed for s in record.steps)
    assert [steps[k].requests for k in ("1", "2", "3-4", "5-8")] == [24, 24, 24, 8]
    assert [steps[k].predictors for k in ("1", "2", "3-4", "5-8")] == [1, 2, 4, 8]
    assert not any(steps[k].too_few_requests for k in ("1", "2", "3-4"))
    assert steps["5-8"].too_few_requests  # marked, not used
    for step in record.steps:
        assert step.errors == 0 and step.throughput_rps > 0
        assert set(step.latency_ms) == {"p50", "p99", "mean"}
        assert set(step.stages_ms) >= {"preprocess", "model"}
        assert set(step.stages_ms["model"]) == {"p50", "p99", "mean"}
    assert record.recommendation["predictors"] in (1, 2, 4)  # never the level with too few requests
    assert record.sharing["verified"] is True and record.sharing["distinct_weight_sets"] == 1
    assert record.model["model_bytes"] == (64 * 8 + 8) * 4  # the Linear's weight and bias, float32


# ------------------------------------------------------------------ the stdlib threaded server, for real

def test_a_threaded_http_server_gives_one_curve_point_per_level_of_its_clients(tmp_path):
    from http.server import ThreadingHTTPServer

    namespace = definitions("http-server")
    phase = Phase()
    namespace["model"] = model = gated_model(phase)  # the recipe's handler calls the module-level model
    server = ThreadingHTTPServer(("127.0.0.1", 0), namespace["Handler"])
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/predict"
    try:
        with gpuscope.profile(out=str(tmp_path / "report"), interval=0.05, model=model, min_requests=20) as prof:
            answers = run_phases(url, phase, PLAN)
    finally:
        server.shutdown()
        server.server_close()
    assert len(answers) == 80 and all(len(a["labels"]) == 2 for a in answers)
    record = load_run(str(tmp_path / "report" / "run.json"))
    assert record.mode == "profile" and record.status == "complete"
    check_curve(record)
    assert set(record.steps[0].stages_ms) == {"preprocess", "model", "postprocess"}
    assert record.steps[0].threads >= 1
    assert record.extra["requests"]["peak_in_flight"] == 8
    assert prof.report_paths and os.path.exists(os.path.join(tmp_path, "report", "throughput_latency.png"))
    html = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    assert "too few requests: not used" in html and "per level of requests in flight" in html

    # check --run gates the live run at its recommended level; the level with too few requests is not gated
    rec = record.recommendation["predictors"]
    p99 = record.step_at(rec).latency_ms["p99"]
    outcome = gate_evaluate(record, Limits(max_p99_ms=p99 + 1000.0))
    assert outcome.exit_code == 0, [r.message for r in outcome.results]
    assert outcome.at_predictors == rec
    assert gate_evaluate(record, Limits(max_p99_ms=p99 / 2)).exit_code == 1
    too_few = gate_evaluate(record, Limits(max_p99_ms=1e6), at_predictors=8)
    assert too_few.exit_code == 2 and "too few requests" in too_few.results[0].message


def test_the_http_server_recipe_runs_verbatim_and_its_run_passes_the_gate(tmp_path):
    """docs/live.md's http.server recipe as a user runs it (only the port differs): real clients, Ctrl-C,
    then `gpuscope check --run` on what it wrote."""
    port = free_port()
    script = tmp_path / "serve.py"
    script.write_text(recipe("http-server").replace("8080", str(port)), encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/predict"
        for _ in range(600):  # wait until it listens (a connection, not a sleep)
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                assert proc.poll() is None, proc.communicate()
                threading.Event().wait(0.05)
        answers = [post(url, {"inputs": [[0.1] * 64]}) for _ in range(60)]
        assert all(len(a["labels"]) == 1 for a in answers)
        proc.send_signal(__import__("signal").SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    run_json = tmp_path / "gpuscope-report" / "run.json"
    record = load_run(str(run_json))
    assert record.status == "complete"
    assert [s.level for s in record.steps] == ["1"] and record.steps[0].requests == 60
    assert record.sharing["verified"] is True
    check = subprocess.run([sys.executable, "-m", "gpuscope", "check", "--run", str(run_json), "--max-p99-ms",
                            "100000"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


# ------------------------------------------------------------------ Flask and FastAPI, real servers

def test_flask_threaded_recipe_under_a_real_server(tmp_path):
    pytest.importorskip("flask")
    from werkzeug.serving import make_server

    namespace = definitions("flask")
    phase = Phase()
    namespace["model"] = model = gated_model(phase)
    server = make_server("127.0.0.1", 0, namespace["app"], threaded=True)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        with gpuscope.profile(out=str(tmp_path / "r"), interval=0.05, model=model, min_requests=20, report=False):
            run_phases(f"http://127.0.0.1:{server.server_port}/predict", phase, PLAN)
    finally:
        server.shutdown()
    check_curve(load_run(str(tmp_path / "r" / "run.json")))


def test_fastapi_sync_endpoint_recipe_under_uvicorn(tmp_path):
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")

    namespace = definitions("fastapi")
    phase = Phase()
    namespace["model"] = model = gated_model(phase)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(namespace["app"], host="127.0.0.1", port=port, log_level="warning"))
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    try:
        for _ in range(600):
            if server.started:
                break
            threading.Event().wait(0.05)
        assert server.started
        with gpuscope.profile(out=str(tmp_path / "r"), interval=0.05, model=model, min_requests=20, report=False):
            run_phases(f"http://127.0.0.1:{port}/predict", phase, PLAN)
    finally:
        server.should_exit = True
        serving.join(timeout=30)
    check_curve(load_run(str(tmp_path / "r" / "run.json")))


def test_thread_pool_recipe_runs_verbatim(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "recipe_thread_pool"}
    exec(compile(recipe("thread-pool"), "docs/live.md (thread-pool)", "exec"), namespace)
    record = namespace["prof"].record
    assert len(namespace["answers"]) == 400
    assert sum(s.requests for s in record.steps) == 400
    assert max(s.predictors for s in record.steps) <= 4  # four workers: never more than four in flight
    assert record.sharing["verified"] is True
    assert record.recommendation["predictors"] is not None or "too" in record.recommendation["reason"]


# ------------------------------------------------------------------ sharing seen from the threads

def _run_on_threads(modules: list[Any]) -> None:
    import torch

    start = threading.Barrier(len(modules))

    def work(module: Any) -> None:
        start.wait(timeout=30)
        with torch.inference_mode():
            for _ in range(3):
                module(torch.randn(2, 16))

    threads = [threading.Thread(target=work, args=(m,), name=f"predictor-{i}") for i, m in enumerate(modules)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_two_threads_running_two_copies_give_duplicate_model(tmp_path):
    import torch

    model = torch.nn.Linear(16, 4)
    copy_ = copy.deepcopy(model)
    with gpuscope.profile(out=str(tmp_path / "r"), model=[model, copy_], report=False) as prof:
        _run_on_threads([model, copy_])
    record = prof.record
    assert record.sharing["distinct_weight_sets"] == 2 and record.sharing["verified"] is False
    duplicate = [f for f in record.findings if f.code == "DUPLICATE_MODEL"]
    assert len(duplicate) == 1 and duplicate[0].severity == "fail"
    assert "2 distinct copies" in duplicate[0].title


def test_a_deep_copy_made_while_profiling_is_seen_through_the_hook_it_carries(tmp_path):
    import torch

    model = torch.nn.Linear(16, 4)
    with gpuscope.profile(out=str(tmp_path / "r"), model=model, report=False) as prof:
        _run_on_threads([model, copy.deepcopy(model)])  # only `model` is registered
    assert prof.record.sharing["distinct_weight_sets"] == 2
    assert prof.record.sharing["unregistered_copies_seen"] == 1
    assert any(f.code == "DUPLICATE_MODEL" for f in prof.record.findings)


def test_threads_sharing_one_model_verify_sharing(tmp_path):
    import torch

    model = torch.nn.Linear(16, 4)
    with gpuscope.profile(out=str(tmp_path / "r"), model=model, report=False) as prof:
        _run_on_threads([model, model, model])
    sharing = prof.record.sharing
    assert sharing["verified"] is True and sharing["distinct_weight_sets"] == 1 and len(sharing["threads"]) == 3
    assert sharing["model_bytes"] == (16 * 4 + 4) * 4
    assert not any(f.code == "DUPLICATE_MODEL" for f in prof.record.findings)
    assert model._forward_pre_hooks == {}  # the hook is gone once the profile stopped


def test_a_registered_model_still_deep_copies_and_saves_while_profiled(tmp_path):
    import torch

    model = torch.nn.Linear(16, 4)
    with gpuscope.profile(out=str(tmp_path / "r"), model=model, report=False):
        clone = copy.deepcopy(model)  # the user's own copy: must not fail on the profile's hook
        torch.save(model, tmp_path / "m.pt")
    restored = torch.load(tmp_path / "m.pt", weights_only=False)
    restored(torch.randn(1, 16))  # its hook was pickled inert
    assert torch.equal(clone.weight, model.weight)


def test_profile_model_refuses_what_is_not_a_module():
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        gpuscope.profile(out="unused", model=object())


# ------------------------------------------------------------------ errors and the fast path

class Boom(Exception):
    pass


def test_a_raising_request_is_counted_as_an_error_and_reraised_unchanged(tmp_path):
    raised = Boom("bad input")

    @request
    def handler() -> None:
        raise raised

    with gpuscope.profile(out=str(tmp_path / "r"), report=False) as prof:
        with pytest.raises(Boom) as caught:
            handler()
        assert caught.value is raised
        with pytest.raises(Boom) as caught_block:
            with request():
                raise raised
        assert caught_block.value is raised and caught_block.tb is not None
        for _ in range(3):
            with request():
                pass
    steps = prof.record.steps
    assert sum(s.errors for s in steps) == 2 and sum(s.requests for s in steps) == 3
    assert any("Boom: bad input" in m for s in steps for m in s.error_messages)


def test_request_outside_a_profile_changes_nothing():
    assert requests_.active_tracker() is None

    @request
    def add(a: int, b: int = 1) -> int:
        """Adds."""
        return a + b

    assert add(2, b=3) == 5 and add.__name__ == "add" and add.__doc__ == "Adds."
    with request() as marked:
        with request.stage("model") as stage:
            pass
    assert marked is stage  # the one shared do-nothing object
    raised = Boom("x")
    with pytest.raises(Boom) as caught:
        with request():
            raise raised
    assert caught.value is raised
    assert requests_.active_tracker() is None


def test_async_handlers_are_refused_with_a_reason():
    with pytest.raises(TypeError, match="async def"):
        @request
        async def handler() -> None:
            pass


def test_importing_request_imports_neither_torch_nor_matplotlib():
    code = ("import sys; from gpuscope import request; request(); "
            "print(sorted(m for m in ('torch', 'matplotlib', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ the tracker's levels, exactly

class Clock:
    """An injected clock: each request's latency is what the test advances it by."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now

    def advance_ms(self, ms: float) -> None:
        self.now += int(ms * 1e6)


def drive(levels: dict[int, tuple[int, float]], clock: Clock | None = None) -> dict[str, Any]:
    """Through the real `request` API on one thread: `n` nested requests are n in flight at once, each lasting
    `latency_ms` on the injected clock. levels: in flight -> (rounds, latency_ms)."""
    clock = clock or Clock()
    tracker = requests_.RequestTracker(clock=clock)
    assert requests_.install(tracker)
    try:
        for level, (rounds, latency_ms) in levels.items():
            for _ in range(rounds):
                opened = [request() for _ in range(level)]
                for marked in opened:
                    marked.__enter__()
                with request.stage("model"):
                    clock.advance_ms(latency_ms)
                for marked in reversed(opened):
                    marked.__exit__(None, None, None)
    finally:
        requests_.uninstall(tracker)
    return tracker.snapshot()


def record_of(levels: list[dict[str, Any]], max_p99_ms: float | None = None, min_requests: int = 50) -> RunRecord:
    thresholds = live_traffic.TrafficThresholds(min_requests=min_requests)
    record = RunRecord(tool_version="test", started_at="now", mode="profile", status="complete")
    record.config["max_p99_ms"] = max_p99_ms
    record.steps = live_traffic.observed_steps(levels, thresholds)
    record.recommendation = live_traffic.traffic_recommendation(record, t=thresholds)
    return record


def test_levels_are_the_most_in_flight_while_each_request_ran():
    snapshot = drive({1: (60, 10.0), 2: (30, 11.0), 4: (15, 20.0), 8: (2, 40.0)})
    by_level = {lv["level"]: lv for lv in snapshot["levels"]}
    assert {n: by_level[n]["requests"] for n in by_level} == {1: 60, 2: 60, 4: 60, 8: 16}
    assert by_level[4]["start_levels"] == {1: 15, 2: 15, 3: 15, 4: 15}  # started at 1..4, all ran at 4
    assert snapshot["peak_in_flight"] == 8 and snapshot["in_flight_at_end"] == 0


def test_the_recommendation_moves_when_a_p99_limit_is_set():
    # measured through the tracker: 1 in flight 10 ms, 2 in flight 11 ms, 4 in flight 20 ms
    levels = drive({1: (60, 10.0), 2: (30, 11.0), 4: (15, 20.0), 8: (2, 40.0)})["levels"]
    free = record_of(levels)
    steps = {s.level: s for s in free.steps}
    assert steps["1"].throughput_rps == pytest.approx(100.0)   # Little: 1 in flight / 10 ms
    assert steps["2"].throughput_rps == pytest.approx(2 / 0.011)
    assert steps["3-4"].throughput_rps == pytest.approx(200.0)
    assert steps["5-8"].too_few_requests                       # 16 < 50: marked, not used
    assert free.recommendation["predictors"] == 4              # 2 is 9% below the best: not within 5%
    limited = record_of(levels, max_p99_ms=15.0)
    assert limited.recommendation["predictors"] == 2           # 4's p99 (20 ms) breaks 15 ms
    assert "limit p99 15.0 ms" in limited.recommendation["reason"]
    none = record_of(levels, max_p99_ms=5.0)
    assert none.recommendation["predictors"] is None and none.recommendation["unmet"] == "max_p99_ms"


def test_throughput_plateau_applies_to_observed_levels():
    from gpuscope.analysis.findings import DEFAULT_THRESHOLDS, rule_throughput_plateau

    levels = drive({1: (60, 10.0), 2: (30, 10.0), 4: (15, 19.5)})["levels"]   # 100, 200, 205 req/s
    record = record_of(levels)
    assert record.recommendation["predictors"] == 2
    found = rule_throughput_plateau(record, DEFAULT_THRESHOLDS)
    assert len(found) == 1 and found[0].at_predictors == 2 and "2 requests in flight" in found[0].title
    growing = record_of(drive({1: (60, 10.0), 2: (30, 10.0)})["levels"])
    assert growing.recommendation["predictors"] == 2 and growing.recommendation.get("still_growing") is True
    assert rule_throughput_plateau(growing, DEFAULT_THRESHOLDS) == []
    single = record_of(drive({1: (60, 10.0)})["levels"])
    assert single.recommendation["predictors"] == 1 and single.recommendation.get("single_level") is True
    assert "only this level" in single.recommendation["reason"]


def test_level_groups_and_too_few_requests():
    assert [live_traffic.level_group(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [
        (1, 1), (2, 2), (3, 4), (3, 4), (5, 8), (5, 8), (9, 16), (9, 16), (17, 32)]
    record = record_of(drive({1: (10, 5.0)})["levels"])
    assert record.steps[0].too_few_requests and record.recommendation["predictors"] is None
    assert "backed by 50 requests" in record.recommendation["reason"]


def test_a_profile_that_marked_nothing_leaves_the_traffic_codes_unmeasured(tmp_path):
    with gpuscope.profile(out=str(tmp_path / "r"), report=False) as prof:
        pass
    record = prof.record
    assert record.steps == [] and set(record.extra["unmeasured_codes"]) >= {"DUPLICATE_MODEL", "THROUGHPUT_PLATEAU"}
    outcome = gate_evaluate(record, Limits(forbid=("DUPLICATE_MODEL", "THROUGHPUT_PLATEAU")))
    assert [r.status for r in outcome.results if r.kind == "forbid"] == ["unmeasured", "unmeasured"]


# ------------------------------------------------------------------ Prometheus

def test_prometheus_exports_request_histograms_by_stage_and_in_flight(tmp_path):
    port = free_port()
    inside = threading.Event()
    release = threading.Event()

    def held() -> None:
        with request():
            inside.set()
            release.wait(timeout=30)

    with gpuscope.profile(out=str(tmp_path / "r"), report=False, prometheus_port=port):
        for _ in range(5):
            with request():
                with request.stage("model"):
                    pass
        worker = threading.Thread(target=held)
        worker.start()
        assert inside.wait(timeout=30)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        release.set()
        worker.join()
    pid = os.getpid()
    assert f'gpuscope_requests_in_flight{{pid="{pid}"}} 1.0' in text
    assert f'gpuscope_requests_total{{outcome="ok",pid="{pid}"}} 5.0' in text
    assert f'gpuscope_request_duration_seconds_count{{pid="{pid}"}} 5.0' in text
    assert f'gpuscope_request_stage_duration_seconds_count{{pid="{pid}",stage="model"}} 5.0' in text
    assert f'gpuscope_request_stage_duration_seconds_bucket{{le="+Inf",pid="{pid}",stage="model"}} 5.0' in text
