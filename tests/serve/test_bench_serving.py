"""``sgl-ray bench serving`` end to end against a real Serve app on 127.0.0.1 (tiny random-weight Qwen2): both
datasets, every backend, through the real command line; plus the request sets, the SSE parsing and the statistics
without a server."""

from __future__ import annotations

import json
import math
import socket

import pytest

from sgl_ray.bench.datasets import DatasetConfig, load_bench_tokenizer, make_requests
from sgl_ray.bench.serving import BACKENDS, LatencyStats, RequestMetrics, ServingMetrics, Usage
from sgl_ray.cli import main

NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN, PREFIX_LEN, NUM_PREFIXES = 8, 16, 4, 64, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bench_url(ray_cluster, tiny_qwen2_path):
    """The tiny model's app under ``/bench`` on this session's Serve (started here on a free port if no other test
    started it; the proxy keeps the first port it was given, so it is read back from the controller)."""
    from ray import serve
    from ray.serve.context import _get_global_client

    from sgl_ray.deployments import build_openai_app

    started = _get_global_client(raise_if_no_controller_running=False) is None
    if started:
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    port = _get_global_client().http_config.port
    app = build_openai_app(
        {"model_path": tiny_qwen2_path, "max_total_tokens": 4096, "served_model_name": "tiny"}
    )
    serve.run(app, name="bench", route_prefix="/bench")
    try:
        yield f"http://127.0.0.1:{port}/bench"
    finally:
        serve.delete("bench")
        if started:
            serve.shutdown()


RUNS = [  # (backend, dataset, extra flags)
    ("openai-chat", "random", ["--request-rate", "100"]),  # Poisson arrivals
    ("sglang-generate", "random", []),
    ("openai-completions", "random", []),
    ("openai-chat", "shared-prefix", ["--flush-cache"]),
    ("sglang-generate", "shared-prefix", ["--flush-cache"]),
]


@pytest.mark.serve
@pytest.mark.slow
def test_bench_serving_end_to_end(bench_url, tiny_qwen2_path, tmp_path, capsys):
    out_file, png = tmp_path / "serving.jsonl", tmp_path / "serving.png"
    for i, (backend, dataset, extra) in enumerate(RUNS):
        argv = ["bench", "serving", "--base-url", bench_url, "--backend", backend, "--dataset", dataset]
        argv += ["--num-prompts", str(NUM_PROMPTS), "--random-input-len", str(INPUT_LEN)]
        argv += ["--output-len", str(OUTPUT_LEN), "--max-concurrency", "4", "--prefix-len", str(PREFIX_LEN)]
        argv += ["--num-prefixes", str(NUM_PREFIXES), "--tokenizer", tiny_qwen2_path]
        argv += ["--output-file", str(out_file), *extra, *(["--plot", str(png)] if i == 0 else [])]
        assert main(argv) == 0
        printed = capsys.readouterr()
        assert "TTFT" in printed.out and "req/s" in printed.out
        print(printed.out)  # the tables, for `pytest -s`

    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [(r["backend"], r["params"]["dataset"]) for r in records] == [(b, d) for b, d, _ in RUNS]
    for rec in records:
        assert rec["bench"] == "serving" and rec["base_url"] == bench_url and rec["date"]
        assert rec["model"] == (None if rec["backend"] == "sglang-generate" else "tiny")
        assert (rec["completed"], rec["failed"], rec["errors"]) == (NUM_PROMPTS, 0, [])
        assert rec["output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
        assert rec["input_tokens"] >= NUM_PROMPTS and rec["duration_s"] > 0
        assert rec["request_throughput"] > 0 and rec["output_throughput"] > 0 and rec["input_throughput"] > 0
        assert rec["max_concurrency"] == 4 and rec["machine"]["cpu_count"] >= 1
        for name in ("ttft", "e2e", "tpot", "itl"):
            stats = rec[name]
            assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"], (name, stats)
            assert stats["mean_ms"] > 0
        assert rec["ttft"]["p99_ms"] <= rec["e2e"]["p99_ms"]
        assert rec["cache_hit_rate"] is not None  # both APIs report cached prompt tokens
    assert records[0]["request_rate"] == 100 and records[1]["request_rate"] == "inf"
    for rec in records[3:]:  # flushed after the warm-up: the hits are the later requests reusing a prefix
        assert rec["params"]["prefix_len"] == PREFIX_LEN
        assert 0 < rec["cache_hit_rate"] < 1 and rec["cached_tokens"] >= PREFIX_LEN

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not png.exists()
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unreachable_server_fails_cleanly(tiny_qwen2_path, tmp_path, capsys):
    argv = ["bench", "serving", "--base-url", f"http://127.0.0.1:{_free_port()}", "--num-prompts", "2"]
    argv += [
        "--backend",
        "sglang-generate",
        "--tokenizer",
        tiny_qwen2_path,
        "--output-file",
        str(tmp_path / "x"),
    ]
    assert main(argv) == 1
    assert "warm-up request" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# --- without a server ---------------------------------------------------------------------------------------------
def test_shared_prefix_requests_spread_over_the_prefixes(tiny_qwen2_path):
    tok = load_bench_tokenizer(tiny_qwen2_path)
    cfg = DatasetConfig("shared-prefix", num_prompts=7, prefix_len=32, num_prefixes=3, question_len=8, seed=3)
    reqs = make_requests(cfg, tok)
    systems = [r.system for r in reqs]
    assert sorted(systems.count(s) for s in set(systems)) == [2, 2, 3]
    assert all(len(tok.encode(s, add_special_tokens=False)) <= 32 for s in set(systems))
    assert len({r.prompt for r in reqs}) == 7 and all(r.output_len == 128 for r in reqs)
    assert reqs == make_requests(cfg, tok)  # deterministic in the seed
    assert [r.prompt for r in reqs] != [
        r.prompt for r in make_requests(DatasetConfig(**{**vars(cfg), "seed": 4}), tok)
    ]
    assert reqs[0].messages()[0] == {"role": "system", "content": reqs[0].system}
    assert reqs[0].text.startswith(reqs[0].system)


def test_random_requests_lengths(tiny_qwen2_path):
    tok = load_bench_tokenizer(tiny_qwen2_path)
    reqs = make_requests(DatasetConfig("random", num_prompts=16, input_len=40, range_ratio=0.5), tok)
    assert all(r.system is None and r.messages() == [{"role": "user", "content": r.prompt}] for r in reqs)
    assert all(
        16 <= r.prompt_len <= 40 for r in reqs
    )  # [20, 40] drawn; re-tokenizing random text may merge a few
    assert len({r.prompt_len for r in reqs}) > 1
    with pytest.raises(ValueError, match="unknown dataset"):
        DatasetConfig("sharegpt")


def test_backend_payloads_and_stream_parsing(tiny_qwen2_path):
    req = make_requests(
        DatasetConfig("random", num_prompts=1, input_len=8, output_len=5),
        load_bench_tokenizer(tiny_qwen2_path),
    )[0]
    chat, completions, native = (
        BACKENDS["openai-chat"],
        BACKENDS["openai-completions"],
        BACKENDS["sglang-generate"],
    )
    body = chat.payload(req, "m")
    assert (body["max_tokens"], body["min_tokens"], body["ignore_eos"], body["stream"]) == (5, 5, True, True)
    assert body["stream_options"] == {"include_usage": True} and body["messages"][-1]["content"] == req.prompt
    assert completions.payload(req, "m")["prompt"] == req.text
    assert native.payload(req, None)["sampling_params"]["max_new_tokens"] == 5

    assert not chat.parse({"choices": [{"delta": {"role": "assistant", "content": ""}}]}, None).content
    assert chat.parse({"choices": [{"delta": {"content": "Hi"}}]}, None).content
    usage = {"prompt_tokens": 9, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 4}}
    assert chat.parse({"choices": [], "usage": usage}, None) == (False, Usage(9, 5, 4))
    assert completions.parse({"choices": [{"text": " x"}], "usage": None}, None) == (True, None)
    # /generate: a token arrived when completion_tokens grew (SGLang streams cumulative text, sgl_ray deltas).
    meta = {"prompt_tokens": 9, "completion_tokens": 2, "cached_tokens": 0}
    assert native.parse({"text": "ab", "meta_info": meta}, Usage(9, 1, 0)) == (True, Usage(9, 2, 0))
    assert not native.parse({"text": "ab", "meta_info": meta}, Usage(9, 2, 0)).content


def test_latency_statistics():
    stats = LatencyStats.of([0.001 * i for i in range(1, 101)])
    assert stats.p50_ms == pytest.approx(50.5) and stats.p99_ms == pytest.approx(99.01)
    assert stats.mean_ms == pytest.approx(50.5) and LatencyStats.of([]) == (None, None, None, None)
    ok = RequestMetrics(True, 10, 5, 4, ttft_s=0.1, e2e_s=0.5, itl_s=(0.1, 0.1, 0.1, 0.1))
    failed = RequestMetrics(False, 10, 0, None, ttft_s=1.0, e2e_s=1.0, error="HTTP 500")
    assert ok.tpot_s == pytest.approx(0.1) and failed.tpot_s is None
    m = ServingMetrics.of([ok, failed], duration_s=2.0)
    assert (m.completed, m.failed, m.input_tokens, m.output_tokens, m.cached_tokens) == (1, 1, 10, 5, 4)
    assert m.cache_hit_rate == pytest.approx(0.4) and m.request_throughput == pytest.approx(0.5)
    assert m.e2e.p50_ms == pytest.approx(500.0) and m.itl.mean_ms == pytest.approx(100.0)
    assert math.isfinite(m.output_throughput)
