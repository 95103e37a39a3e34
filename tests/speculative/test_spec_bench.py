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


def test_verify_cost_bench_times_each_draft_count(tiny_llama_path):
    """``sgl-ray bench spec-verify`` on the tiny Llama: a row per draft count, each step sampling every row it
    ran (checked inside), and workloads that cannot run refused."""
    import argparse

    import pytest

    from sgl_ray.bench.cli import add_bench_args
    from sgl_ray.bench.spec_verify import format_report, run_spec_verify

    parser = argparse.ArgumentParser()
    add_bench_args(parser)
    ns = parser.parse_args(["spec-verify", "--context", "8", "--drafts", "2,5"])
    assert (ns.bench_command, ns.context, ns.drafts) == ("spec-verify", 8, "2,5")

    args = EngineArgs(model_path=tiny_llama_path, max_total_tokens=512)
    report = run_spec_verify(args, context=40, drafts=[1, 3, 7], repeats=2)
    assert report.context == 40 and not report.decode_graph and report.decode_ms > 0
    assert [r.drafts for r in report.rows] == [1, 3, 7]
    assert all(r.ms > 0 and abs(r.ratio - r.ms / report.decode_ms) < 1e-9 for r in report.rows)
    assert "x decode" in format_report(report)
    with pytest.raises(ValueError, match="does not fit"):
        run_spec_verify(args, context=600, drafts=[4], repeats=1)
    with pytest.raises(ValueError, match="leave --speculative-algorithm unset"):
        run_spec_verify(args.replace(speculative_algorithm="NGRAM"), context=40, drafts=[4], repeats=1)


def test_bench_tasks_build_their_prompts(smollm2_path):
    """Each workload of ``--task`` asks about the passages in its own words; ``edit`` hands over a passage with
    typos to fix."""
    import argparse

    from sgl_ray.bench.cli import add_bench_args
    from sgl_ray.bench.speculative import PASSAGES, TASKS, task_prompts, with_typos
    from sgl_ray.model_loader import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(smollm2_path))
    texts = {}
    for task in TASKS:
        prompts = task_prompts(tokenizer, 7, task)
        assert len(prompts) == 7 and len({tuple(p) for p in prompts}) == 7
        texts[task] = [tokenizer.decode(p) for p in prompts]
    assert PASSAGES[0] in texts["copy"][0] and PASSAGES[0] in texts["summarize"][0]
    assert with_typos(PASSAGES[0]) != PASSAGES[0] and with_typos(PASSAGES[0]) in texts["edit"][0]
    assert (
        texts["copy"][6] != texts["copy"][0] and PASSAGES[0] in texts["copy"][6]
    )  # the task's second wording
    parser = argparse.ArgumentParser()
    add_bench_args(parser)
    assert parser.parse_args(["speculative", "--task", "edit,summarize"]).task == "edit,summarize"
