"""EngineArgs rejects impossible settings up front, with a typed error naming the setting."""

from __future__ import annotations

import pytest

from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.errors import InvalidRequestError


@pytest.mark.parametrize(
    "changes",
    [
        {"page_size": 0},
        {"mem_fraction_static": 1.0},
        {"max_running_requests": 0},
        {"chunked_prefill_size": 0},
        {"tp_size": 0},
        {"cuda_graph_max_bs": 0},
        {"load_format": "pt"},
        {"grammar_compile_timeout": 0},
        {"schedule_policy": "random"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_bad_settings_are_typed_errors_naming_the_setting(changes):
    (name,) = changes
    with pytest.raises(InvalidRequestError) as err:
        EngineArgs(model_path="x", **changes)
    assert err.value.param == name and name in str(err.value)


def test_defaults_are_valid_and_cli_flags_cover_the_new_timeout():
    import argparse

    args = EngineArgs(model_path="x")
    assert args.grammar_compile_timeout == 300.0
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    ns = parser.parse_args(["--model-path", "x", "--grammar-compile-timeout", "12.5"])
    assert ns.grammar_compile_timeout == 12.5
