"""Translator workloads: loading one, its requests, and each stage timed per request by the predictor pool."""
from __future__ import annotations

import json

import pytest
import torch

from gpuscope.measure.models import ModelLoadError, load_model, validate_model, weight_pointers
from gpuscope.measure.sweep import step_from_run
from gpuscope.measure.translator import RequestsError, load_requests_file
from gpuscope.measure.workload import PredictorPool
from gpuscope.probes.readings import Unavailable
from gpuscope.probes.schedstat import ThreadTimes, parse_schedstat, read_thread_times

M = "tests.predictor_models:"


def test_a_factory_returning_a_translator_serves_its_model_and_its_example_requests():
    model = load_model(M + "text", "cpu")
    assert model.translator is not None and model.translator.name == "TextTranslator"
    assert model.module is model.translator.owner.model  # sharing is verified on the model it holds
    assert weight_pointers(model.module) and model.param_bytes == (16 * 16 + 16) * 4
    assert model.requests_source == "example_requests" and len(model.requests) == 4
    assert model.to_json()["translator"] == {"type": "TextTranslator", "preprocess": True, "postprocess": True,
                                             "model_type": "Clean"}
    response = model.stages().run(model.requests[0])
    assert isinstance(response, list) and len(response) == 16


@pytest.mark.parametrize("factory", ["tokenizer", "positional"])
def test_a_preprocess_returning_a_tokenizers_mapping_or_a_tuple_calls_the_model_with_keywords_or_positions(factory):
    """A Hugging Face predictor: preprocess returns input_ids and attention_mask (a mapping: `model(**inputs)`),
    or a tuple (`model(ids, mask)`). Calling the model with the mapping as one input failed every request."""
    model = load_model(M + factory, "cpu")
    stages = model.stages()
    for request in model.requests:
        expected = model.module(**model.translator.owner.preprocess(request)) if factory == "tokenizer" \
            else model.module(*model.translator.owner.preprocess(request))
        assert stages.run(request) == expected["logits"].argmax(-1).tolist()
    run = PredictorPool(model).run_step(2, max_duration_s=0.3, warmup_s=0.0, window_s=0.3)
    assert run.errors == 0 and run.requests > 0


def test_tensors_inside_a_mapping_list_or_tuple_move_to_the_models_device():
    from gpuscope.measure.translator import to_device

    ids, mask = torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3)
    moved = to_device({"input_ids": ids, "extra": [mask, (mask, "text")], "n": 3}, "meta")
    assert moved["input_ids"].device.type == "meta" and moved["input_ids"].dtype == torch.long
    assert moved["extra"][0].device.type == "meta" and moved["extra"][1][0].device.type == "meta"
    assert moved["extra"][1][1] == "text" and moved["n"] == 3 and isinstance(moved["extra"][1], tuple)
    assert ids.device.type == "cpu"  # the request's own tensors are not changed in place


def test_requests_file_wins_over_example_requests_and_is_cycled(tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_text('"alpha"\n\n"beta"\n')
    model = load_model(M + "text", "cpu", requests_path=str(path))
    assert model.requests == ["alpha", "beta"] and model.requests_source == f"file:{path}"


def test_a_plain_model_with_requests_turns_json_numbers_into_tensors(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps([[0.5] * 16, [1.0] * 16]) + "\n")
    model = load_model(M + "clean", "cpu", requests_path=str(path))
    validate_model(model)
    out = model.stages().run(model.requests[0])
    assert tuple(out.shape) == (2, 16)


@pytest.mark.parametrize("content, says", [
    (None, "no such file"), ('"ok"\n[1, 2\n', "line 2 is not JSON"), ("\n", "holds no request"),
    ('"a"\nNaN\n', "line 2 is not JSON"), (b"\xff\xfe", "not UTF-8"),
])
def test_bad_requests_files_say_why_in_one_line(tmp_path, content, says):
    path = tmp_path / "r.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(RequestsError, match=says) as info:
        load_requests_file(str(path))
    assert "\n" not in str(info.value)


def test_a_preprocess_that_raises_names_the_stage_and_the_request(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('"first"\n')
    model = load_model(M + "raising", "cpu", requests_path=str(path))
    with pytest.raises(ModelLoadError, match=r"preprocess rejected request 1 of .*r.jsonl: ValueError: cannot decode"):
        validate_model(model)


def test_a_translator_without_requests_needs_an_input_shape():
    class Bare:
        model = torch.nn.Linear(4, 4)

        def preprocess(self, request):
            return request

    import sys
    import types

    module = types.ModuleType("gpuscope_bare_translator")
    module.make = Bare
    sys.modules["gpuscope_bare_translator"] = module
    try:
        with pytest.raises(ModelLoadError, match="--input-shape.*--requests"):
            load_model("gpuscope_bare_translator:make", "cpu")
        model = load_model("gpuscope_bare_translator:make", "cpu", input_shape=(2, 4))
        validate_model(model)  # the random input stands for the request
        assert model.requests is None and model.requests_source == "input_shape"
    finally:
        del sys.modules["gpuscope_bare_translator"]


def fixed_reader():
    """A scheduler reader whose every thread gains 0.4 s on a CPU and 0.1 s queued from one read to the next."""
    calls: dict[int, int] = {}

    def read(tid: int) -> ThreadTimes:
        calls[tid] = calls.get(tid, 0) + 1
        return ThreadTimes(on_cpu_ns=calls[tid] * 400_000_000, runqueue_ns=calls[tid] * 100_000_000)

    return read


def test_the_pool_times_each_stage_and_the_step_keeps_p50_p99_mean():
    model = load_model(M + "text", "cpu")
    pool = PredictorPool(model, sched_reader=fixed_reader())
    run = pool.run_step(2, max_duration_s=0.4, warmup_s=0.05, window_s=0.2)
    assert run.requests > 0
    stages = run.stages_ms()
    assert set(stages) == {"preprocess", "model", "postprocess"}
    assert all(len(v) == run.requests for v in stages.values())
    latencies = run.latencies_ms()
    total = [a + b + c for a, b, c in zip(*(r for r in (stages["preprocess"], stages["model"], stages["postprocess"])))]
    assert all(t <= lat + 1e-6 for t, lat in zip(sorted(total), sorted(latencies)))  # stages fit in the latency
    # the injected reader: +0.4 s on a CPU and +0.1 s queued per thread between the window's two reads
    assert run.thread_times_s["on_cpu"] == pytest.approx(0.8) and run.thread_times_s["runqueue"] == pytest.approx(0.2)
    step = step_from_run(run, {}, 1, run.measure_start_ns, run.measure_start_ns, run.measure_end_ns)
    assert set(step.stages_ms) == {"preprocess", "model", "postprocess"}
    assert set(step.stages_ms["model"]) == {"p50", "p99", "mean"}
    assert step.thread_times_s["blocked"] == pytest.approx(max(0.0, step.thread_times_s["wall"] - 1.0))


def test_a_plain_model_has_no_stages_and_unreadable_scheduler_times_stay_unavailable():
    model = load_model("builtin:mlp", "cpu")
    unreadable = Unavailable("not_supported", "no schedstat here")
    pool = PredictorPool(model, sched_reader=lambda tid: unreadable)
    run = pool.run_step(1, max_duration_s=0.3, warmup_s=0.0, window_s=0.1)
    assert run.stages_ms() == {} and run.thread_times_s == unreadable
    step = step_from_run(run, {}, 1, run.measure_start_ns, run.measure_start_ns, run.measure_end_ns)
    assert step.stages_ms is None and step.thread_times_s == unreadable


def test_schedstat_parses_and_reads_this_thread():
    assert parse_schedstat("218705640 178251799 70\n") == ThreadTimes(218705640, 178251799)
    with pytest.raises(ValueError):
        parse_schedstat("12")
    import threading

    times = read_thread_times(threading.get_native_id())
    assert isinstance(times, ThreadTimes) or isinstance(times, Unavailable)
    assert isinstance(read_thread_times(2 ** 30), Unavailable)


def test_compare_workers_load_translators_with_their_requests(tmp_path):
    from gpuscope.measure.workers import WorkerSpec, _load

    path = tmp_path / "r.jsonl"
    path.write_text('"one"\n"two"\n')
    spec = WorkerSpec(model=M + "text", device="cpu", requests_path=str(path))
    model, info = _load(spec.to_json())
    assert model.translator is not None and model.requests == ["one", "two"]
    assert info["model"]["translator"]["type"] == "TextTranslator"


def test_a_model_that_takes_the_mapping_or_the_tuple_whole_gets_it_whole():
    """forward(self, batch) with preprocess returning {"ids": ...} or (ids, mask): spreading it failed every
    request ("unexpected keyword argument 'ids'"); the signature says to pass it as the one input."""
    import torch

    from gpuscope.measure.translator import keyword_or_positional

    class Whole(torch.nn.Module):
        def forward(self, batch):
            return batch["ids"] * 2 if isinstance(batch, dict) else batch[0] + batch[1]

    class Spread(torch.nn.Module):
        def forward(self, ids, mask=None):
            return ids * (2 if mask is None else mask)

    ids, mask = torch.ones(2), torch.full((2,), 3.0)
    assert keyword_or_positional(Whole())({"ids": ids}).tolist() == [2.0, 2.0]
    assert keyword_or_positional(Whole())((ids, mask)).tolist() == [4.0, 4.0]
    call = keyword_or_positional(Spread())
    assert call({"ids": ids, "mask": mask}).tolist() == [3.0, 3.0] and call((ids, mask)).tolist() == [3.0, 3.0]
    assert call({"ids": ids}).tolist() == [2.0, 2.0]  # another set of keys is decided again

    class Both(torch.nn.Module):
        def forward(self, ids, mask):
            return ids * mask

    with pytest.raises(TypeError, match="nope"):  # neither way binds: spread, the model's own error says why
        keyword_or_positional(Both())({"nope": ids})


def test_an_input_that_does_not_fit_a_spreading_model_gets_the_model_s_own_error_not_a_whole_mapping():
    """forward(self, input_ids, attention_mask=None) given an extra key, or forward(x, y=None) a 3-tuple:
    passing it whole would bind (to input_ids, to x) and fail deep inside the model ("'dict' object has no
    attribute ..."); spread, the error names what does not fit."""
    import torch

    from gpuscope.measure.translator import keyword_or_positional

    class Bert(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids.sum()

    class Pair(torch.nn.Module):
        def forward(self, x, y=None):
            return x.sum()

    ids = torch.ones(2)
    with pytest.raises(TypeError, match="token_type_ids"):
        keyword_or_positional(Bert())({"input_ids": ids, "token_type_ids": ids})
    with pytest.raises(TypeError, match="positional"):
        keyword_or_positional(Pair())((ids, ids, ids))
    assert keyword_or_positional(Bert())({"input_ids": ids}).item() == 2.0  # one that fits is spread
