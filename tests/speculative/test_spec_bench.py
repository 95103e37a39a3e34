"""``sgl-ray bench speculative`` end to end on the tiny Llama (a draft model equal to the target: every draft kept)."""

from __future__ import annotations

from sgl_ray.bench.speculative import format_speculative, run_speculative
from sgl_ray.configs.engine_args import EngineArgs


def test_bench_runs_both_modes_side_by_side(tiny_llama_path):
    args = EngineArgs(
        model_path=tiny_llama_path,
        max_total_tokens=2048,
        speculative_algorithm="STANDALONE",
        speculative_draft_model_path=tiny_llama_path,
        speculative_num_steps=3,
    )
    run, (off, on), identical = run_speculative(args, num_prompts=2, max_new_tokens=9, rounds=1)
    assert identical
    assert (off.mode, on.mode) == ("off", "STANDALONE")
    assert off.output_tokens == on.output_tokens == 18 and off.verify_steps == 0
    assert on.verify_steps == 4 and on.accept_length == 4.0 and on.accept_rate == 1.0  # 1 + 2 x 4 tokens each
    assert "greedy outputs identical: yes" in format_speculative([off, on], identical)
    assert run.engine_args["speculative_algorithm"] == "STANDALONE"
