"""Predictors for the translator, GIL and thread-safety tests: importable as `--model tests.predictor_models:NAME`.

Each is small and does exactly one thing the tests name: pure-Python preprocessing
that holds the GIL, numpy preprocessing that releases it, a module or translator
keeping per-request state, dropout left on, and clean ones that only read.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

WIDTH = 16


class Clean(nn.Module):
    """Only reads its weights."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)
        self.example_input_shape = (2, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


class Stateful(nn.Module):
    """Keeps the last request's hidden state and mixes it into the next answer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)
        self.last = torch.zeros(2, WIDTH)
        self.example_input_shape = (2, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        out = h + self.last
        self.last = h
        return out


class RunningMean(nn.Module):
    """Updates a registered buffer in place on every request (a running statistic)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)
        self.register_buffer("mean", torch.zeros(WIDTH))
        self.example_input_shape = (2, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        self.mean.mul_(0.9).add_(0.1 * h.mean(0))
        return h - self.mean


class Dropout(nn.Module):
    """Dropout switched back on after eval(): random outputs even one request at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)
        self.example_input_shape = (2, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(self.lin(x), p=0.5, training=True)


def _tokens(text: str) -> list[float]:
    return [float((ord(c) * 31) % 97) / 97.0 for c in text[:WIDTH].ljust(WIDTH)]


class TextTranslator:
    """A clean translator: requests are strings, preprocess builds a tensor, postprocess a list."""

    def __init__(self) -> None:
        self.model = Clean()

    def preprocess(self, request: str) -> torch.Tensor:
        return torch.tensor([_tokens(request), _tokens(request[::-1])])

    def postprocess(self, output: torch.Tensor) -> list[float]:
        return [round(v, 6) for v in output[0].tolist()]

    def example_requests(self) -> list[str]:
        return ["hello world", "gpuscope", "threads and the GIL", "one more request"]


class StatefulTranslator(TextTranslator):
    """Keeps the current request on the shared translator: concurrent requests read each other's."""

    def preprocess(self, request: str) -> torch.Tensor:
        self.current = request
        return torch.tensor([_tokens(self.current), _tokens(self.current[::-1])])


class PurePythonTranslator(TextTranslator):
    """Pure-Python preprocessing that holds the GIL for ~`work` iterations; a tiny model."""

    work = 20_000

    def preprocess(self, request: str) -> torch.Tensor:
        acc = 0
        for i in range(self.work):  # Python bytecode: holds the GIL throughout
            acc = (acc * 31 + i) % 1_000_003
        row = _tokens(request)
        row[0] = acc / 1_000_003
        return torch.tensor([row, row])


class NumpyTranslator(TextTranslator):
    """Preprocessing in numpy that releases the GIL while it works (sorting a large array)."""

    size = 400_000

    def __init__(self) -> None:
        super().__init__()
        import numpy as np

        self.data = np.random.default_rng(0).random(self.size)

    def preprocess(self, request: str) -> torch.Tensor:
        import numpy as np

        ordered = np.sort(self.data, kind="stable")  # numpy's sort releases the GIL
        row = _tokens(request)
        row[0] = float(ordered[len(ordered) // 2])
        return torch.tensor([row, row], dtype=torch.float32)


_SCRATCH: dict[str, Any] = {}


class RacyGlobalTranslator(TextTranslator):
    """Keeps the request in a module-level dict (not on any watched object) and yields the GIL before reading it
    back: only the outputs under concurrency can show it."""

    def preprocess(self, request: str) -> torch.Tensor:
        _SCRATCH["request"] = request
        time.sleep(0.002)  # the predictor's own I/O stand-in: another thread runs meanwhile
        return torch.tensor([_tokens(_SCRATCH["request"]), _tokens(_SCRATCH["request"][::-1])])


class RaisingTranslator(TextTranslator):
    """Its preprocess rejects every request."""

    def preprocess(self, request: Any) -> torch.Tensor:
        raise ValueError(f"cannot decode request {request!r}")


class KeywordModel(nn.Module):
    """Shaped like a Hugging Face model: keyword inputs from a tokenizer, a mapping out (like ModelOutput)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        hidden = self.embed(input_ids)
        if attention_mask is not None:
            hidden = hidden * attention_mask.unsqueeze(-1)
        return {"logits": self.head(hidden.mean(dim=1))}


class TokenizerTranslator:
    """preprocess returns what a tokenizer returns (a mapping of CPU tensors); the model takes it as keywords."""

    def __init__(self) -> None:
        self.model = KeywordModel().eval()

    def preprocess(self, request: str) -> dict[str, torch.Tensor]:
        ids = [sum(map(ord, word)) % 64 for word in request.split()]
        return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}

    def postprocess(self, output: dict[str, torch.Tensor]) -> list[int]:
        return output["logits"].argmax(-1).tolist()

    def example_requests(self) -> list[str]:
        return ["hello world", "the quick brown fox", "a b c"]


class PositionalTranslator(TokenizerTranslator):
    """preprocess returns a tuple: the model takes it as positional arguments (model(ids, mask))."""

    def preprocess(self, request: str) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        inputs = super().preprocess(request)
        return inputs["input_ids"], inputs["attention_mask"]


def clean() -> Clean:
    return Clean()


def stateful() -> Stateful:
    return Stateful()


def running_mean() -> RunningMean:
    return RunningMean()


def dropout() -> Dropout:
    return Dropout()


def text() -> TextTranslator:
    return TextTranslator()


def stateful_translator() -> StatefulTranslator:
    return StatefulTranslator()


def pure_python() -> PurePythonTranslator:
    return PurePythonTranslator()


def numpy_translator() -> NumpyTranslator:
    return NumpyTranslator()


def racy_global() -> RacyGlobalTranslator:
    return RacyGlobalTranslator()


def raising() -> RaisingTranslator:
    return RaisingTranslator()


def tokenizer() -> TokenizerTranslator:
    return TokenizerTranslator()


def positional() -> PositionalTranslator:
    return PositionalTranslator()
