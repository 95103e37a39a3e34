"""Frontend-language fixtures: a ``RuntimeEndpoint`` on the session's Serve app, the examples as modules, and
transformers scoring on the same SmolLM2 weights."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from ..conftest import API_KEY

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="session")
def endpoint(serve_url):
    import sgl_ray.lang as sgl

    return sgl.RuntimeEndpoint(serve_url, api_key=API_KEY)


@pytest.fixture(scope="session")
def example_argv(serve_url) -> list[str]:
    return ["--url", serve_url, "--api-key", API_KEY, "--max-tokens", "12"]


@pytest.fixture(scope="session")
def load_example():
    """``load_example("lang_chat")`` → the example module (``examples/`` on the path for ``lang_common``)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


class Scorer:
    """Choice logprobs from transformers: the tokens ``context + choice`` adds after ``context``'s tokens."""

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer

    def token_logprobs(self, context: str, choice: str) -> list[float]:
        ctx = self.tokenizer.encode(context)
        full = self.tokenizer.encode(context + choice)
        start = 0
        while start < min(len(ctx), len(full)) and ctx[start] == full[start]:
            start += 1
        start = min(max(start, 1), len(full) - 1)
        with torch.no_grad():
            logits = self.model(torch.tensor([full])).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        return [logp[i - 1, full[i]].item() for i in range(start, len(full))]

    def normalized(self, context: str, choices: list[str]) -> list[float]:
        return [sum(lp) / len(lp) for lp in (self.token_logprobs(context, c) for c in choices)]


@pytest.fixture(scope="session")
def scorer(hf_reference, smollm2_path):
    from sgl_ray.model_loader import load_tokenizer, resolve_model

    return Scorer(hf_reference("smollm2").model, load_tokenizer(resolve_model(smollm2_path)))
