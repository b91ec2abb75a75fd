"""The command line (composition root). Heavy imports (torch, matplotlib, reports) happen inside commands,
so `gpuscope --help` answers instantly.

Every failure a user can cause ends in one line on stderr and exit code 2; a
crash inside gpuscope still leaves samples.jsonl and run.json on disk.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

import typer
from typing_extensions import Annotated

from gpuscope.measure.exporter import DEFAULT_PORT as DEFAULT_EXPORT_PORT
from gpuscope.record.errors import EXIT_USAGE, OutputError, UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="gpuscope: GPU memory and device-contention profiler for multi-threaded model inference.")

# ---- options shared by `diagnose` and `check` (one definition each)
Model = Annotated[str, typer.Option("--model", "-m", help="builtin:mlp|cnn|transformer, a TorchScript .pt, a torch.export .pt2, or package.module:factory")]
ModelSize = Annotated[Optional[str], typer.Option("--model-size", help="built-in model size: small|medium|large (default: small on CPU, large on GPU)")]
InputShape = Annotated[Optional[str], typer.Option("--input-shape", help="input shape, e.g. 8x3x224x224 (needed for user models without a default)")]
DType = Annotated[Optional[str], typer.Option("--dtype", help="input dtype: float32 (default), float16, bfloat16, int64 ...")]
Device = Annotated[str, typer.Option("--device", help="auto|cpu|cuda|cuda:N")]
Predictors = Annotated[Optional[str], typer.Option("--predictors", "-p", help="predictor counts, e.g. 1,2,4,8 (default: powers of two up to 2x usable cores)")]
Duration = Annotated[str, typer.Option("--duration", help="longest measured time per step, e.g. 6s")]
Warmup = Annotated[str, typer.Option("--warmup", help="warm-up per step before measuring")]
Window = Annotated[str, typer.Option("--window", help="throughput window; a step is stable when its last 3 agree within 10%")]
Interval = Annotated[str, typer.Option("--interval", help="sampling interval (>= 5ms)")]
Streams = Annotated[bool, typer.Option("--streams/--no-streams", help="one long-lived CUDA stream per predictor")]
CopyModel = Annotated[bool, typer.Option("--copy-model", help="naive deployment: a copy of the model per predictor")]
InferenceMode = Annotated[bool, typer.Option("--inference-mode/--no-inference-mode", help="enter torch.inference_mode() in each predictor (default on)")]
IntraOp = Annotated[Optional[int], typer.Option("--intra-op-threads", help="torch intra-op threads (default: torch's default), to mirror your server")]
Rate = Annotated[Optional[float], typer.Option("--rate", help="open-loop arrivals at this many requests/s instead of closed-loop")]
MaxP99 = Annotated[Optional[float], typer.Option("--max-p99-ms", help="stop the sweep once p99 latency passes this (and recommend within it)")]
Out = Annotated[str, typer.Option("--out", "-o", help="output folder")]
Requests = Annotated[Optional[str], typer.Option("--requests", help="requests for a translator (or the model): a JSONL file, one JSON value per line, cycled through")]
OutputTolerance = Annotated[Optional[float], typer.Option("--output-tolerance", help="thread-safety check: responses may differ by this much (absolute and relative) and still match (default: exactly)")]
Trust = Annotated[bool, typer.Option("--trust-model-file", help="allow loading a pickled model file (it can run arbitrary code: only for files you trust)")]


def _options(**kwargs: Any) -> Any:
    from gpuscope.measure.options import DiagnoseOptions

    return DiagnoseOptions(**kwargs)


def _run_session(opts: Any, **hooks: Any) -> Any:
    from gpuscope.commands.diagnose import run_diagnose

    return run_diagnose(opts, **hooks)


@app.command()
def diagnose(model: Model = "builtin:mlp", model_size: ModelSize = None, input_shape: InputShape = None,
             dtype: DType = None, device: Device = "auto", predictors: Predictors = None, duration: Duration = "6s",
             warmup: Warmup = "0.5s", window: Window = "1s", interval: Interval = "50ms", streams: Streams = False,
             copy_model: CopyModel = False, inference_mode: InferenceMode = True, intra_op_threads: IntraOp = None,
             rate: Rate = None, max_p99_ms: MaxP99 = None, out: Out = "gpuscope-report", trust_model_file: Trust = False,
             requests: Requests = None, output_tolerance: OutputTolerance = None,
             json_output: Annotated[bool, typer.Option("--json", help="print the run summary as JSON instead of the table")] = False,
             quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")] = False) -> None:
    """Run a multi-threaded inference sweep on a model and explain what it saw."""
    from gpuscope.reports.text import format_summary, summary_json

    opts = _options(model=model, model_size=model_size, input_shape=input_shape, dtype=dtype, device=device,
                    predictors=predictors, duration=duration, warmup=warmup, window=window, interval=interval,
                    streams=streams, copy_model=copy_model, inference_mode=inference_mode,
                    intra_op_threads=intra_op_threads, rate=rate, max_p99_ms=max_p99_ms, out=out,
                    trust_model_file=trust_model_file, json_output=json_output, quiet=quiet, requests=requests,
                    output_tolerance=output_tolerance)
    result = _run_session(opts)
    if json_output:
        typer.echo(json.dumps(summary_json(result.record), indent=2, default=str))
    else:
        typer.echo(format_summary(result.record))
        typer.echo(f"\nwrote {os.path.join(result.out_dir, 'run.json')}"
                   + (f" and {result.report_paths['html']}" if result.report_paths and "html" in result.report_paths else ""))
    raise typer.Exit(result.exit_code)


@app.command()
def check(run: Annotated[Optional[str], typer.Option("--run", help="evaluate a saved run.json instead of running a sweep")] = None,
          max_device_memory: Annotated[Optional[str], typer.Option("--max-device-memory", help="peak GPU memory of the process, e.g. 20GiB")] = None,
          max_host_memory: Annotated[Optional[str], typer.Option("--max-host-memory", help="peak RSS, e.g. 8GiB")] = None,
          min_headroom_pct: Annotated[Optional[str], typer.Option("--min-headroom-pct", help="free device memory left, in percent")] = None,
          max_p99_ms_limit: Annotated[Optional[str], typer.Option("--max-p99-ms", help="p99 latency limit in ms")] = None,
          min_throughput: Annotated[Optional[str], typer.Option("--min-throughput", help="requests/s")] = None,
          max_memory_per_predictor: Annotated[Optional[str], typer.Option("--max-memory-per-predictor", help="e.g. 256MiB")] = None,
          forbid: Annotated[Optional[str], typer.Option("--forbid", help="finding codes that fail the gate, e.g. duplicate-model,foreign-process")] = None,
          fail_on: Annotated[Optional[str], typer.Option("--fail-on", help="severity of findings that fail the gate: warn|fail")] = None,
          at_predictors: Annotated[Optional[int], typer.Option("--at-predictors", help="evaluate at this predictor count (default: the recommendation)")] = None,
          config: Annotated[Optional[str], typer.Option("--config", help="a gpuscope.toml with a \\[check] table")] = None,
          junit: Annotated[Optional[str], typer.Option("--junit", help="write JUnit XML here")] = None,
          json_path: Annotated[Optional[str], typer.Option("--json", help="write the outcome as JSON here")] = None,
          model: Model = "builtin:mlp", model_size: ModelSize = None, input_shape: InputShape = None, dtype: DType = None,
          device: Device = "auto", predictors: Predictors = None, duration: Duration = "6s", warmup: Warmup = "0.5s",
          window: Window = "1s", interval: Interval = "50ms", streams: Streams = False, copy_model: CopyModel = False,
          inference_mode: InferenceMode = True, intra_op_threads: IntraOp = None, rate: Rate = None,
          out: Out = "gpuscope-report", trust_model_file: Trust = False, requests: Requests = None,
          output_tolerance: OutputTolerance = None,
          quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")] = False) -> None:
    """Gate a deployment: exit 0 when every limit passes, 1 when one fails, 2 when one could not be measured."""
    from gpuscope.commands.check import limits_from_sources, run_check
    from gpuscope.record.run import load_run

    cli_values = {"max_device_memory": max_device_memory, "max_host_memory": max_host_memory,
                  "min_headroom_pct": min_headroom_pct, "max_p99_ms": max_p99_ms_limit, "min_throughput": min_throughput,
                  "max_memory_per_predictor": max_memory_per_predictor, "forbid": forbid, "fail_on": fail_on,
                  "at_predictors": at_predictors}
    limits = limits_from_sources(os.getcwd(), config, cli_values)
    if run is not None:
        record = load_run(run)
    else:
        at = limits.gated_count(at_predictors)
        p99_for_sweep = limits.sweep_p99_limit_ms(at_predictors)
        opts = _options(model=model, model_size=model_size, input_shape=input_shape, dtype=dtype, device=device,
                        predictors=predictors, duration=duration, warmup=warmup, window=window, interval=interval,
                        streams=streams, copy_model=copy_model, inference_mode=inference_mode,
                        intra_op_threads=intra_op_threads, rate=rate, max_p99_ms=p99_for_sweep, out=out,
                        trust_model_file=trust_model_file, quiet=quiet, include_predictors=at, requests=requests,
                        output_tolerance=output_tolerance)
        gate: dict[str, int] = {}

        def check_before_report(record: Any) -> None:  # so report.html shows the gate's outcome
            gate["code"] = run_check(record, limits, at_predictors=at_predictors, junit_path=junit,
                                     json_path=json_path, run_path=os.path.join(record.config["out"], "run.json"))

        result = _run_session(opts, before_report=check_before_report)
        if "code" not in gate:  # interrupted or failed before the gate could run
            if result.record is not None and (junit or json_path):
                # the outputs a CI reads must describe this run, never stay from the last one: evaluated on
                # what was measured (an unfinished run's findings are unmeasured, so it cannot pass)
                run_check(result.record, limits, at_predictors=at_predictors, junit_path=junit, json_path=json_path)
            raise typer.Exit(result.exit_code)
        # the gate's verdict; a report that could not be rendered turns a pass into 2, never a fail into a pass
        raise typer.Exit(gate["code"] or result.exit_code)
    code = run_check(record, limits, at_predictors=at_predictors, junit_path=junit, json_path=json_path)
    raise typer.Exit(code)


@app.command()
def report(run_json: Annotated[str, typer.Argument(help="a run.json written by gpuscope")],
           out: Annotated[Optional[str], typer.Option("--out", "-o", help="folder for the report (default: beside run.json)")] = None) -> None:
    """Render report.html and the PNG plots again from a saved run (also an interrupted one)."""
    from gpuscope.reports.render import report_command

    raise typer.Exit(report_command(run_json, out))


@app.command()
def compare(model: Model = "builtin:mlp", model_size: ModelSize = None, input_shape: InputShape = None,
            dtype: DType = None, device: Device = "auto",
            predictors: Annotated[Optional[str], typer.Option("--predictors", "-p", help="predictor counts, e.g. 1,2,4 (default: 1, 2, ... up to the usable cores, at most 4)")] = None,
            duration: Annotated[str, typer.Option("--duration", help="measured time per step and mode, e.g. 5s")] = "5s",
            warmup: Annotated[str, typer.Option("--warmup", help="warm-up per step before measuring")] = "1s",
            interval: Annotated[str, typer.Option("--interval", help="memory sampling interval (>= 5ms)")] = "200ms",
            streams: Streams = False, intra_op_threads: IntraOp = None, out: Out = "gpuscope-compare",
            trust_model_file: Trust = False, requests: Requests = None,
            json_output: Annotated[bool, typer.Option("--json", help="print the comparison as JSON instead of the table")] = False,
            quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")] = False) -> None:
    """Threads versus processes: N predictor threads sharing one model against N spawned worker processes."""
    from gpuscope.commands.compare import CompareOptions, run_compare
    from gpuscope.reports.text import format_comparison

    result = run_compare(CompareOptions(model=model, model_size=model_size, input_shape=input_shape, dtype=dtype,
                                        device=device, predictors=predictors, duration=duration, warmup=warmup,
                                        interval=interval, streams=streams, intra_op_threads=intra_op_threads, out=out,
                                        trust_model_file=trust_model_file, json_output=json_output, quiet=quiet,
                                        requests=requests))
    if result.record is not None:
        if json_output:
            typer.echo(json.dumps(result.record.extra.get("comparison"), indent=2, default=str))
        else:
            typer.echo(format_comparison(result.record))
            html = (result.report_paths or {}).get("html")
            typer.echo(f"\nwrote {os.path.join(result.out_dir, 'run.json')}" + (f" and {html}" if html else ""))
    else:
        sys.stderr.write("gpuscope: interrupted before the model loaded: nothing measured\n")
    raise typer.Exit(result.exit_code)


@app.command()
def tune(model: Model = "builtin:mlp", model_size: ModelSize = None, input_shape: InputShape = None,
         dtype: DType = None, device: Device = "auto", predictors: Predictors = None,
         intra_op_threads: Annotated[Optional[str], typer.Option("--intra-op-threads", help="intra-op thread counts to try, e.g. 1,2,4 (default: 1, cores/N, torch's default)")] = None,
         env: Annotated[Optional[list[str]], typer.Option("--env", help="an environment setting to try, NAME=VALUE, each in a fresh process (repeatable)")] = None,
         budget: Annotated[str, typer.Option("--budget", help="time for the whole search, e.g. 90s, 3m")] = "3m",
         max_p99_ms: Annotated[Optional[float], typer.Option("--max-p99-ms", help="constraint: p99 latency in ms")] = None,
         max_device_memory: Annotated[Optional[str], typer.Option("--max-device-memory", help="constraint: peak GPU memory of the process, e.g. 20GiB")] = None,
         max_host_memory: Annotated[Optional[str], typer.Option("--max-host-memory", help="constraint: peak RSS, e.g. 8GiB")] = None,
         duration: Annotated[str, typer.Option("--duration", help="longest measured time per configuration")] = "3s",
         warmup: Warmup = "0.3s", window: Annotated[str, typer.Option("--window", help="throughput window; a configuration is stable when its last 3 agree within 10%")] = "0.5s",
         interval: Interval = "50ms", rate: Rate = None, out: Out = "gpuscope-tune", trust_model_file: Trust = False,
         json_output: Annotated[bool, typer.Option("--json", help="print run.json's tuning block instead of the table")] = False,
         quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")] = False) -> None:
    """Search predictors x intra-op threads (x streams and memory settings on CUDA) for the best deployment within a budget."""
    from gpuscope.commands.tune import TuneOptions, format_tuning, run_tune

    result = run_tune(TuneOptions(model=model, model_size=model_size, input_shape=input_shape, dtype=dtype, device=device,
                                  predictors=predictors, threads=intra_op_threads, env=tuple(env or ()), budget=budget,
                                  max_p99_ms=max_p99_ms, max_device_memory=max_device_memory,
                                  max_host_memory=max_host_memory, duration=duration, warmup=warmup, window=window,
                                  interval=interval, rate=rate, out=out, trust_model_file=trust_model_file,
                                  json_output=json_output, quiet=quiet))
    if json_output:
        typer.echo(json.dumps({"tuning": result.record.tuning, "recommendation": result.record.recommendation,
                               "status": result.record.status}, indent=2, default=str))
    else:
        typer.echo(format_tuning(result.record))
        html = (result.report_paths or {}).get("html")
        typer.echo(f"\nwrote {os.path.join(result.out_dir, 'run.json')}" + (f" and {html}" if html else ""))
    raise typer.Exit(result.exit_code)


def _print_version(value: bool) -> None:
    if value:
        from gpuscope import __version__

        typer.echo(f"gpuscope {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version_flag: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                     help="print gpuscope's version and exit")] = False) -> None:
    """gpuscope: GPU memory and device-contention profiler for multi-threaded model inference."""


@app.command()
def version() -> None:
    """Print gpuscope's version."""
    from gpuscope import __version__

    typer.echo(__version__)


@app.command()
def ps(json_output: Annotated[bool, typer.Option("--json", help="print JSON instead of the table")] = False) -> None:
    """Every GPU with its memory and utilisation, and every process on it: user, command line, engines; shared devices flagged."""
    from gpuscope.commands.ps import run_ps

    raise typer.Exit(run_ps(json_output))


@app.command()
def watch(pid: Annotated[int, typer.Option("--pid", help="the running process to watch")],
          interval: Annotated[str, typer.Option("--interval", help="sampling interval, e.g. 1s, 200ms")] = "1s",
          duration: Annotated[str, typer.Option("--duration", help="how long to watch; it also ends when the process exits, or on Ctrl-C")] = "10m",
          out: Out = "gpuscope-report",
          prometheus_port: Annotated[Optional[int], typer.Option("--prometheus-port", help="also serve Prometheus metrics on this port while watching")] = None,
          bind: Annotated[str, typer.Option("--bind", help="address the metrics endpoint listens on")] = "127.0.0.1",
          json_output: Annotated[bool, typer.Option("--json", help="print the outcome as JSON instead of the summary")] = False,
          quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no live status line")] = False) -> None:
    """Sample a running process from outside (GPU memory, host memory and CPU, engines, neighbours) and write the report."""
    from gpuscope.commands.watch import watch_command

    raise typer.Exit(watch_command(pid, interval, duration, out, prometheus_port, bind, quiet, json_output))


@app.command()
def export(port: Annotated[int, typer.Option("--port", help="TCP port of the /metrics and /healthz endpoint (9840: no common exporter's default)")] = DEFAULT_EXPORT_PORT,
           bind: Annotated[str, typer.Option("--bind", help="address to listen on (default: loopback only)")] = "127.0.0.1") -> None:
    """Serve every GPU and process on this node as Prometheus metrics until Ctrl-C; without NVML it keeps serving gpuscope_nvml_available 0 and retries."""
    from gpuscope.commands.export import run_export

    raise typer.Exit(run_export(port, bind))


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input, imported only if their modules are already loaded."""
    types: list[type[BaseException]] = [UsageError, OutputError]
    for module, name in (("gpuscope.record.run", "RunFileError"), ("gpuscope.analysis.limits", "CheckConfigError"),
                         ("gpuscope.measure.models", "ModelLoadError"),
                         ("gpuscope.measure.translator", "RequestsError"), ("gpuscope.probes.samplefile", "SamplesFileError")):
        mod = sys.modules.get(module)
        if mod is not None and hasattr(mod, name):
            types.append(getattr(mod, name))
    return tuple(types)


class _CtrlC:
    """SIGINT outside a command's own handler (imports, model loading, rendering): noted, then the
    usual KeyboardInterrupt. Typer turns that into a silent exit code 130, so the note is how main()
    knows to say why the command stopped."""

    seen = False

    @classmethod
    def handler(cls, signum: int, frame: Any) -> None:
        cls.seen = True
        raise KeyboardInterrupt


def _note_ctrl_c() -> Any:
    """Install _CtrlC.handler where Python's default SIGINT handler is in place; the previous handler."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return None
    _CtrlC.seen = False
    return signal.signal(signal.SIGINT, _CtrlC.handler)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the Typer app, turning bad input into one line on stderr and exit code 2."""
    import signal

    previous = _note_ctrl_c()
    try:
        result = app(args=argv, prog_name="gpuscope", standalone_mode=False)
        code = int(result or 0)
        if code == 130 and _CtrlC.seen:
            sys.stderr.write("gpuscope: interrupted\n")
        return code
    except typer.Exit as exc:
        return int(getattr(exc, "exit_code", 0))
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("gpuscope: interrupted\n")
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # click's usage errors (typer vendors click)
            sys.stderr.write(f"gpuscope: error: {exc.format_message()}\n")
            return EXIT_USAGE
        if isinstance(exc, _user_error_types()):
            sys.stderr.write(f"gpuscope: error: {exc}\n")
            return EXIT_USAGE
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
