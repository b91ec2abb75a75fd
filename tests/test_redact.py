"""Secrets in other processes' command lines and environments never reach an output; harmless text is untouched."""
from __future__ import annotations

import pytest

from gpuscope.probes.redact import REDACTED, is_secret_name, redact_argv, redact_cmdline, redact_env, redact_text


@pytest.mark.parametrize("argv, expected", [
    (["serve", "--token=abc123"], ["serve", "--token=***"]),
    (["serve", "--token", "abc123", "--port", "8000"], ["serve", "--token", "***", "--port", "8000"]),
    (["serve", "--hf-token", "hf_abc"], ["serve", "--hf-token", "***"]),
    (["serve", "--password", "hunter2"], ["serve", "--password", "***"]),
    (["serve", "--passwd=hunter2"], ["serve", "--passwd=***"]),
    (["serve", "--api-key=SECRET123"], ["serve", "--api-key=***"]),
    (["serve", "--api_key", "SECRET123"], ["serve", "--api_key", "***"]),
    (["serve", "--access-key=AKIA..."], ["serve", "--access-key=***"]),
    (["serve", "--client-secret", "s"], ["serve", "--client-secret", "***"]),
    (["serve", "--key", "k"], ["serve", "--key", "***"]),
    (["env", "AWS_SECRET_ACCESS_KEY=abc", "python", "x.py"], ["env", "AWS_SECRET_ACCESS_KEY=***", "python", "x.py"]),
    (["env", "HF_TOKEN=hf_abc", "DB_PASSWORD=p", "OPENAI_API_KEY=sk-1"],
     ["env", "HF_TOKEN=***", "DB_PASSWORD=***", "OPENAI_API_KEY=***"]),
    (["worker", "postgres://svc:pa55@db:5432/app"], ["worker", "postgres://svc:***@db:5432/app"]),
    (["worker", "--broker=redis://:s3cret@cache:6379/0"], ["worker", "--broker=redis://:***@cache:6379/0"]),
    (["worker", "--db", "https://user:p@ss@host/x"], ["worker", "--db", "https://user:***@host/x"]),
])
def test_each_secret_pattern_is_redacted(argv, expected):
    assert redact_argv(argv) == expected
    assert "hunter2" not in " ".join(redact_argv(argv))


@pytest.mark.parametrize("argv", [
    ["python", "serve.py", "--keys=3"],
    ["python", "serve.py", "--model", "m.pt"],
    ["python", "-c", "print('<b>html</b>')"],
    ["<b>html</b>"],
    ["serve", "--monkey=3", "--num-keys", "4"],
    ["serve", "--tokenizer", "meta-llama/Llama-3-8B", "--skip-tokenizer-init", "--port", "8000"],
    ["torchrun", "--nproc-per-node=2", "PATH=/usr/bin", "CUDA_VISIBLE_DEVICES=0,1"],
    ["curl", "http://host:8080/path", "git@github.com:org/repo.git"],
    ["-p", "x"],  # ambiguous: left alone
    [],
])
def test_harmless_arguments_are_unchanged(argv):
    assert redact_argv(argv) == argv


def test_the_secret_is_gone_from_the_foreign_process_of_the_h200_capture():
    # the foreign process of the timeline capture carried both an API key and markup
    argv = ["/opt/torch/.venv/bin/python3", "-c", "import torch", "--api-key=SECRET123", "<b>html</b>"]
    out = redact_argv(argv)
    assert "SECRET123" not in " ".join(out)
    assert out[-1] == "<b>html</b>"  # escaping is the renderer's job; redaction leaves markup as it is


def test_a_secret_flag_at_the_end_hides_nothing_else():
    assert redact_argv(["serve", "--token"]) == ["serve", "--token"]


def test_redact_cmdline_splits_on_whitespace():
    assert redact_cmdline("python serve.py --token abc  --port 1") == "python serve.py --token *** --port 1"


def test_redact_text_finds_credentials_anywhere():
    text = "connect to http://a:b@h and ftp://c:d@i/x now"
    assert redact_text(text) == f"connect to http://a:{REDACTED}@h and ftp://c:{REDACTED}@i/x now"


def test_redact_env_hides_secret_values_and_url_credentials():
    env = {"HF_TOKEN": "hf_abc", "DATABASE_URL": "postgres://u:pw@db/app", "CUDA_VISIBLE_DEVICES": "0",
           "TOKENIZERS_PARALLELISM": "false"}
    assert redact_env(env) == {"HF_TOKEN": "***", "DATABASE_URL": "postgres://u:***@db/app",
                               "CUDA_VISIBLE_DEVICES": "0", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.parametrize("name, secret", [
    ("--token", True), ("HF_TOKEN", True), ("--auth-token", True), ("GITHUB_TOKEN", True), ("--api-key", True),
    ("KEY", True), ("--private_key", True), ("CREDENTIALS", True), ("--pwd", True),
    ("--keys", False), ("--model", False), ("--tokenizer", False), ("TOKENIZERS_PARALLELISM", False),
    ("--monkey", False), ("PATH", False),
])
def test_secret_names(name, secret):
    assert is_secret_name(name) is secret
