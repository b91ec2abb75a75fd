"""gpuscope's core: workload, sweep, findings, checks, the run record, and the CLI.

`profiler.profile()` is the in-process API (see profiler/inprocess.py); it is
imported lazily here so `import profiler` stays cheap.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def profile(*args: Any, **kwargs: Any) -> Any:
    """Profile the current process: `with profiler.profile(out="gpuscope-report"):`."""
    from gpuscope.inprocess import profile as _profile

    return _profile(*args, **kwargs)
