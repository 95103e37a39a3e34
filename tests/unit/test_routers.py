"""The request routers' decisions on plain data (the Serve tests run them between real replicas), and the
``--router`` flag of ``sgl-ray serve``."""

from __future__ import annotations

import pytest

from sgl_ray.cli import build_parser
from sgl_ray.deployments.router import PREFIX_BLOCK, rank_replicas, round_robin_tiers
from sgl_ray.deployments.serve_cli import app_args
from sgl_ray.errors import InvalidRequestError
from sgl_ray.mem_cache.prefix_hash import block_hashes


def test_round_robin_cycles_through_replicas_in_id_order():
    ids = ["r2", "r0", "r1"]
    firsts = [round_robin_tiers(ids, turn)[0] for turn in range(6)]
    assert firsts == [["r0"], ["r1"], ["r2"], ["r0"], ["r1"], ["r2"]]
    assert round_robin_tiers(ids, 1) == [["r1"], ["r2", "r0"]]  # the rest are fallbacks when it is full
    assert round_robin_tiers(["only"], 7) == [["only"], []]


def test_prefix_cache_routing_prefers_the_longest_exact_match_unless_overloaded():
    prompt = list(range(100, 100 + 3 * PREFIX_BLOCK))
    hashes = block_hashes(prompt, PREFIX_BLOCK)
    stats = {
        "a": {"prefix_blocks": hashes[:1], "num_running": 0},
        "b": {"prefix_blocks": hashes[:3], "num_running": 2},
        "c": {"num_running": 1},
    }
    body = {"prompts": [prompt + [1, 2]]}
    assert rank_replicas(stats, body, imbalanced_threshold=8) == ([["b"], ["a", "c"]], "cache")
    # Too busy: load wins.
    stats["b"]["num_waiting"] = 20
    assert rank_replicas(stats, body, imbalanced_threshold=8) == ([["a", "c", "b"]], "load")
    # A different prompt (even with the same first tokens shifted by one) matches nothing.
    assert rank_replicas(stats, {"prompts": [[5] + prompt]}, 8)[1] == "load"


def test_serve_router_flag():
    parse = build_parser().parse_args
    assert app_args(parse(["serve"]))["router"] == "prefix-cache"
    args = app_args(parse(["serve", "--router", "round-robin", "--num-replicas", "2"]))
    assert args["router"] == "round-robin" and "routing_imbalance" not in args
    with pytest.raises(SystemExit):
        parse(["serve", "--router", "random"])
    args = app_args(parse(["serve", "--max-request-resumes", "5", "--request-resume-timeout-s", "2.5"]))
    assert args["max_request_resumes"] == 5 and args["request_resume_timeout_s"] == 2.5
    assert "allowed_local_media_path" not in args
    args = app_args(parse(["serve", "--allowed-local-media-path", "/data/images"]))
    assert args["allowed_local_media_path"] == "/data/images"
    from sgl_ray.deployments.app import build_openai_app

    with pytest.raises(InvalidRequestError, match="router"):
        build_openai_app({"router": "random"})
