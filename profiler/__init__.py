"""gpuscope's core: workload, sweep, findings, checks, the run record, and the CLI.

`gpuscope.profile()` is the in-process API (see profiler/inprocess.py) and
`gpuscope.request` marks a live server's requests (profiler/measure/requests.py);
both are imported lazily here so `import gpuscope` stays cheap and imports
neither torch nor matplotlib.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def profile(*args: Any, **kwargs: Any) -> Any:
    """Profile the current process: `with gpuscope.profile(out="gpuscope-report"):`."""
    from gpuscope.inprocess import profile as _profile

    return _profile(*args, **kwargs)


def __getattr__(name: str) -> Any:
    """`from gpuscope import request` loads only the small, import-free request marker."""
    if name == "request":
        from gpuscope.measure.requests import request

        return request
    raise AttributeError(f"module 'gpuscope' has no attribute {name!r}")
