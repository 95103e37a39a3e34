"""Fixtures of the unit tier."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.model_loader import iter_weights, load_hf_config, load_tokenizer, resolve_model
from sgl_ray.runner.model_runner import ModelRunner

from .scheduler_harness import CONTEXT, MAX_REQS, POOL
from .triton_interpreter import TritonInterpreter


@pytest.fixture(scope="session")
def model(tiny_qwen2_path: str) -> tuple[ModelRunner, Any]:
    source = resolve_model(tiny_qwen2_path)
    args = EngineArgs(
        model_path=tiny_qwen2_path,
        device="cpu",
        dtype="float32",
        max_total_tokens=POOL,
        max_running_requests=MAX_REQS,
    )
    config = ModelConfig(load_hf_config(source), torch.float32, CONTEXT)
    return ModelRunner(args, config, iter_weights(source)), load_tokenizer(source)


@pytest.fixture(scope="session")
def triton_interpreter():
    """``triton_interpreter.run(script)``: "" if the script ran to its end under Triton's CPU interpreter, else
    its traceback (one process for the session's interpreter tests)."""
    pytest.importorskip("triton")
    interpreter = TritonInterpreter()
    yield interpreter
    interpreter.close()
