"""Redacting secrets from command lines and environment values.

Command lines of other processes are attacker-controlled text and often carry
credentials (`--api-key=...`, `postgres://user:pass@host`). Every output
(terminal, JSON, HTML) goes through here before it shows one.
"""
from __future__ import annotations

import re

REDACTED = "***"

_SECRET_NAME_RE = re.compile(
    r"(?i)(token(?!iz)|secret|passw(or)?d|pwd|api[-_]?key|access[-_]?key|private[-_]?key|credential|auth|(^|[-_])key$)"
)
# the password runs to the last "@" before the host: an unescaped "@" inside it must not leak its tail
_URL_CREDENTIALS_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/\s:@]*):([^/\s]+)@")
_FLAG_WITH_VALUE_RE = re.compile(r"^(--?[A-Za-z0-9][A-Za-z0-9_.-]*)=(.*)$", re.S)
_ASSIGNMENT_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.-]*)=(.*)$", re.S)


def is_secret_name(name: str) -> bool:
    """True for flag or variable names that usually hold credentials."""
    return bool(_SECRET_NAME_RE.search(name.lstrip("-")))


def redact_text(text: str) -> str:
    """Redact credentials embedded in URLs anywhere in a string."""
    return _URL_CREDENTIALS_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}:{REDACTED}@", text)


def redact_argv(argv: list[str]) -> list[str]:
    """Redact secret values in an argument vector.

    Handles `--token=X`, `--token X`, `-p X` is left alone (ambiguous), `API_KEY=X`
    assignments (env-style prefixes), and credentials in URLs.
    """
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        flag = _FLAG_WITH_VALUE_RE.match(arg)
        if flag:
            name, _value = flag.groups()
            out.append(f"{name}={REDACTED}" if is_secret_name(name) else redact_text(arg))
            continue
        if arg.startswith("-") and is_secret_name(arg):
            out.append(arg)
            hide_next = True
            continue
        assignment = _ASSIGNMENT_RE.match(arg)
        if assignment and is_secret_name(assignment.group(1)):
            out.append(f"{assignment.group(1)}={REDACTED}")
            continue
        out.append(redact_text(arg))
    return out


def redact_cmdline(cmdline: str) -> str:
    """Redact a command line given as one string (split on whitespace)."""
    return " ".join(redact_argv(cmdline.split()))


def redact_env(env: dict[str, str]) -> dict[str, str]:
    """Redact values of secret-looking variables and URL credentials in the rest."""
    return {k: (REDACTED if is_secret_name(k) else redact_text(v)) for k, v in env.items()}


def printable(text: object) -> str:
    """Outside text for a terminal: control characters (escape sequences) shown escaped, never obeyed."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))
