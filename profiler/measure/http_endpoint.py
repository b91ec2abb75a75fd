"""The HTTP server behind every gpuscope metrics endpoint: /metrics from a registry, /healthz beside it.

prometheus-client's own `start_http_server` answers every path with the metrics,
so a Kubernetes liveness probe would cost a full NVML reading and could not be
told apart from a scrape. This is the same threaded WSGI server with one more
route. `/healthz` is liveness only: 200 as long as the process serves, whatever
NVML says (a driver being upgraded is reported by `gpuscope_nvml_available 0`,
not by a failing probe that would make the kubelet restart a pod that a restart
cannot help). Its body says the NVML state in one line, for a human with curl.
"""
from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any, Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

HEALTH_PATH = "/healthz"


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a hung scraper never keeps the process alive


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # no access log on stderr: the caller's output stays its own


def _family(bind: str, port: int) -> int:
    """The address family of the first address `bind` resolves to (IPv6 literals and names too)."""
    infos = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM)
    return infos[0][0]


def serve(registry: Any, port: int, bind: str, health: Callable[[], str] | None = None) -> tuple[Any, threading.Thread]:
    """Serve `registry` on http://BIND:PORT/metrics and a 200 on /healthz, from a daemon thread.

    Raises OSError when it cannot listen (port taken, address not here) and ValueError for
    an address that is not one; the caller turns both into a one-line usage error.
    """
    from prometheus_client import make_wsgi_app

    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ.get("PATH_INFO") == HEALTH_PATH:
            try:
                text = "ok\n" + (health() if health is not None else "")
            except Exception as exc:  # the answer is still "alive": say what the state read hit
                text = f"ok\nstate unreadable: {type(exc).__name__}\n"
            body = text.encode("utf-8", errors="replace")
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        return metrics(environ, start_response)

    server_class = type("GpuscopeServer", (_ThreadingServer,), {"address_family": _family(bind, port)})
    server = make_server(bind, port, app, server_class, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="gpuscope-metrics", daemon=True)
    thread.start()
    return server, thread
