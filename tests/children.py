"""Child processes for tests that read another process's /proc: started, and waited for until they run.

Read between fork and exec, a child's /proc shows the parent's command line, or an RSS of 0 while exec
swaps its memory: a test that reads it at once fails only when the machine is busy (it did, at 1 in 15).
"""
from __future__ import annotations

import subprocess
import sys


def running_python(code: str = "import time; time.sleep(120)", *args: str) -> subprocess.Popen:
    """A Python child that has exec'd and started `code` (it says "ready" first; we wait for that line)."""
    child = subprocess.Popen([sys.executable, "-c", f"print('ready', flush=True); {code}", *args],
                             stdout=subprocess.PIPE, text=True)
    line = child.stdout.readline() if child.stdout is not None else ""
    if line.strip() != "ready":
        child.kill()
        child.wait()
        raise RuntimeError(f"the child did not start: {line!r}")
    return child
