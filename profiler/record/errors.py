"""Errors that end a command with one clear line on stderr and exit code 2."""
from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user (arguments, files, devices): one line, exit 2."""


class OutputError(Exception):
    """The output folder cannot be written (permissions, disk full): one line, exit 2."""


EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143
