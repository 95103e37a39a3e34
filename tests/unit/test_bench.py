"""``sgl-ray bench offline`` end to end on a tiny random-weight model: all three workloads, with the transformers
baseline, through the real command line; plus the table and record helpers."""

from __future__ import annotations

import json

from sgl_ray.bench.report import SystemResult, WorkloadResult, format_table
from sgl_ray.cli import main

NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN, PREFIX_LEN = 4, 16, 4, 64


def test_bench_offline_end_to_end(tiny_qwen2_path, tmp_path, capsys):
    out_file = tmp_path / "bench.jsonl"
    argv = ["bench", "offline", "--model-path", tiny_qwen2_path, "--output-file", str(out_file)]
    argv += [
        "--num-prompts",
        str(NUM_PROMPTS),
        "--input-len",
        str(INPUT_LEN),
        "--output-len",
        str(OUTPUT_LEN),
    ]
    argv += ["--prefix-len", str(PREFIX_LEN), "--hf-batch-size", "3"]  # 3: the last HF batch is a partial one
    # Prefill chunks of one prefix: the first request's prefix is cached before the others are admitted (all four
    # prompts would otherwise be prefilled in the same step, before anything is in the cache).
    argv += ["--chunked-prefill-size", str(PREFIX_LEN)]
    assert main(argv) == 0

    records = {r["workload"]: r for r in map(json.loads, out_file.read_text().splitlines())}
    assert set(records) == {"bs1", "batch", "shared-prefix"}
    expected_systems = {
        "bs1": {"sgl_ray", "transformers"},
        "batch": {"sgl_ray", "transformers"},
        "shared-prefix": {"sgl_ray", "sgl_ray-radix-off"},
    }
    for name, rec in records.items():
        assert set(rec["systems"]) == expected_systems[name]
        assert rec["model"] == tiny_qwen2_path and rec["dtype"] == "float32"
        assert rec["machine"]["cpu_count"] >= 1 and rec["machine"]["torch_threads"] >= 1
        assert rec["date"] and rec["ratio"] > 0
        num_requests = 1 if name == "bs1" else NUM_PROMPTS
        for system in rec["systems"].values():
            assert system["num_requests"] == num_requests
            assert system["output_tokens"] == num_requests * OUTPUT_LEN
            assert system["wall_s"] > 0
            assert system["output_tok_s"] > 0 and system["total_tok_s"] > system["output_tok_s"]
            assert system["requests_s"] > 0

    bs1, batch = records["bs1"]["systems"], records["batch"]["systems"]
    assert bs1["sgl_ray"]["input_tokens"] == bs1["transformers"]["input_tokens"] == INPUT_LEN
    assert batch["sgl_ray"]["input_tokens"] == batch["transformers"]["input_tokens"]
    assert NUM_PROMPTS * INPUT_LEN // 2 <= batch["sgl_ray"]["input_tokens"] <= NUM_PROMPTS * INPUT_LEN
    assert bs1["sgl_ray"]["cached_tokens"] == 0  # flushed before the timed run
    assert bs1["transformers"]["cached_tokens"] is None
    assert all(s["num_preemptions"] == 0 for s in (bs1["sgl_ray"], batch["sgl_ray"]))

    shared = records["shared-prefix"]
    assert shared["params"]["prefix_len"] == PREFIX_LEN
    on, off = shared["systems"]["sgl_ray"], shared["systems"]["sgl_ray-radix-off"]
    assert on["input_tokens"] == off["input_tokens"] > NUM_PROMPTS * PREFIX_LEN
    assert on["cached_tokens"] > 0
    assert off["cached_tokens"] == 0

    table = capsys.readouterr().out
    assert "shared-prefix" in table and "transformers" in table and "out tok/s" in table


def test_table_ratio_column():
    ours = SystemResult("sgl_ray", num_requests=2, input_tokens=10, output_tokens=8, wall_s=1.0)
    base = SystemResult("transformers", num_requests=2, input_tokens=10, output_tokens=8, wall_s=4.0)
    alone = SystemResult("sgl_ray", num_requests=1, input_tokens=5, output_tokens=4, wall_s=2.0)
    table = format_table([WorkloadResult("batch", {}, ours, base), WorkloadResult("bs1", {}, alone)])
    header, _, first, second, third = table.splitlines()
    assert header.split(" | ")[0].strip() == "workload"
    assert first.split("|")[-1].strip() == "4.00x" and second.split("|")[-1].strip() == "1.00x"
    assert third.split("|")[-1].strip() == "-"
    assert first.split("|")[6].strip() == "8.0"  # out tok/s


def test_bench_structured_end_to_end(tiny_llama_path, tmp_path, capsys):
    """Two batch sizes in one run: one record per size, three modes each, like-for-like token counts, and
    jump-forward taking fewer decode steps over the schemas' forced keys."""
    out_file = tmp_path / "structured.jsonl"
    argv = [
        "bench",
        "structured",
        "--model-path",
        tiny_llama_path,
        "--device",
        "cpu",
        "--num-prompts",
        "2",
        "3",
    ]
    argv += ["--max-new-tokens", "24", "--repeats", "1", "--output-file", str(out_file)]
    assert main(argv) == 0

    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["params"]["num_prompts"] for r in records] == [2, 3]
    for rec in records:
        modes = rec["modes"]
        assert list(modes) == ["unconstrained", "constrained", "constrained+jump-forward"]
        n = rec["params"]["num_prompts"]
        assert all(m["requests"] == n for m in modes.values())
        assert modes["unconstrained"]["output_tokens"] == modes["constrained"]["output_tokens"]
        assert modes["constrained"]["jump_forward_tokens"] == 0
        assert modes["constrained+jump-forward"]["jump_forward_tokens"] > 0
        assert modes["constrained+jump-forward"]["decode_steps"] < modes["constrained"]["decode_steps"]
    printed = capsys.readouterr().out
    assert "2 prompts at once" in printed and "3 prompts at once" in printed
