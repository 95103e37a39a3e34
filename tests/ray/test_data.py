"""The Ray Data processor: a pipeline of engine actors gives the same greedy completions as ``sgl_ray.Engine``,
ordering rows by prompt prefix turns recomputed shared prefixes into prefix-cache hits, and without it rows come
back in input order."""

from __future__ import annotations

import json
import time

import pytest

import sgl_ray
from sgl_ray.deployments.data import OUTPUT_COLUMNS, PROMPT_KEY, ProcessorConfig, build_processor

from ..engine.prompts import PROMPTS

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ray_data = pytest.importorskip("ray.data")

NEW = 4
GREEDY = {"temperature": 0.0, "max_new_tokens": NEW, "ignore_eos": True}


def _prompt_row(row: dict) -> dict:
    return {"id": row["id"], "prompt": row["text"], "sampling_params": GREEDY}


def _tag(row: dict) -> dict:
    return {**row, "tagged": f"row-{row['id']}"}


NEAR_TIE = (
    1e-3  # logprob gap under which batch composition (GEMM shapes, reused prefix KV) may flip a greedy pick
)


def _same_greedy(got: list[int], ref: dict, what: str) -> bool:
    """``got`` is the reference's greedy output, or leaves it only where the reference's two best tokens were
    within float noise of each other (it picked the runner-up there; later tokens follow another text). Returns
    whether the two are identical."""
    tops = ref["meta_info"]["output_top_logprobs"]
    for j, (a, b) in enumerate(zip(got, ref["output_ids"], strict=True)):
        if a != b:
            (lp1, t1), (lp2, t2) = tops[j][:2]
            assert (t1, t2) == (b, a) and lp1 - lp2 < NEAR_TIE, (
                f"{what}: token {j} is {a}, not {b} ({tops[j]})"
            )
            return False
    return True


@pytest.fixture(scope="module")
def reference(tiny_qwen2_path):
    """One in-process engine on the same weights, the reference of every test here."""
    with sgl_ray.Engine(tiny_qwen2_path, max_total_tokens=4096) as engine:
        yield engine


def test_pipeline_matches_engine_in_input_order(ray_cluster, tiny_qwen2_path, reference):
    """Two engine actors and small batches give the engine's greedy outputs. Without prefix ordering the rows come
    back in input order, as the README says, although their lengths fall along the input (the first rows generate
    the most), so later batches finish first."""
    n = 24
    texts = [PROMPTS[i % len(PROMPTS)] + f" (item {i})" for i in range(n)]
    params = [{**GREEDY, "max_new_tokens": 2 + (n - i) // 3} for i in range(n)]  # 10 new tokens down to 2
    expected = reference.generate(texts, params, return_logprob=True, top_logprobs_num=2)

    def preprocess(row: dict) -> dict:
        return {"id": row["id"], "prompt": row["text"], "sampling_params": params[row["id"]]}

    processor = build_processor(
        ProcessorConfig(
            engine_kwargs={"model_path": tiny_qwen2_path, "max_total_tokens": 4096},
            concurrency=2,
            batch_size=3,
            order_by_prefix=False,
        ),
        preprocess=preprocess,
        postprocess=_tag,
    )
    ds = ray_data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)], override_num_blocks=8)
    rows = processor(ds).take_all()

    assert [r["id"] for r in rows] == list(range(n))
    for i, row in enumerate(rows):
        assert set(OUTPUT_COLUMNS) <= row.keys() and PROMPT_KEY not in row
        assert row["tagged"] == f"row-{i}" and row["prompt"] == texts[i]
        assert row["num_generated_tokens"] == params[i]["max_new_tokens"] and row["finish_reason"] == "length"
        if _same_greedy(list(row["generated_tokens"]), expected[i], f"row {i}"):
            assert row["generated_text"] == expected[i]["text"]
        assert row["num_input_tokens"] == len(reference.tokenizer.encode(texts[i]))
        assert row["time_taken_llm"] > 0
    # The input dataset's own context (here the driver's global one) is left as it was.
    assert not ds.context.execution_options.preserve_order


# --- prefix-aware ordering ------------------------------------------------------------------------------------------

TOPICS = ("apples", "rivers", "engines", "violins")
QUESTIONS = 8


def _family_prefix(topic: str) -> str:
    facts = " ".join(
        f"Fact {i} about {topic}: it is number {i * 7 + len(topic)} on the list." for i in range(16)
    )
    return f"Notes on {topic}. {facts}\n"


def _shared_prefix_rows() -> list[dict]:
    """4 families of 8 questions behind a ~270-token prefix each, interleaved (a, b, c, d, a, b, …): in input order
    every batch of 8 holds two rows of every family."""
    return [
        {"id": q * len(TOPICS) + f, "text": _family_prefix(t) + f"Question {q}: what is fact {q}?"}
        for q in range(QUESTIONS)
        for f, t in enumerate(TOPICS)
    ]


def test_prefix_ordering_turns_recompute_into_cache_hits(ray_cluster, tiny_qwen2_path):
    # The KV pool holds about two and a half families' prefixes: room for a family at a time, not for four at once.
    config = ProcessorConfig(
        engine_kwargs={"model_path": tiny_qwen2_path, "max_total_tokens": 768},
        batch_size=8,
        max_concurrent_batches=1,
    )
    processor = build_processor(config, preprocess=_prompt_row)
    items = _shared_prefix_rows()
    results, cached, wall = {}, {}, {}
    for ordered in (False, True):
        ds = ray_data.from_items(items, override_num_blocks=4)
        started = time.perf_counter()
        rows = processor.with_config(order_by_prefix=ordered)(ds).take_all()
        wall[ordered] = time.perf_counter() - started
        assert len(rows) == len(items)
        results[ordered] = {r["id"]: list(r["generated_tokens"]) for r in rows}
        cached[ordered] = sum(r["num_cached_tokens"] for r in rows)
    print(
        f"\nprefix ordering: cached tokens {cached[True]} (ordered) vs {cached[False]} (input order); "
        f"wall {wall[True]:.1f}s vs {wall[False]:.1f}s"
    )
    assert results[True] == results[False]
    assert cached[True] > cached[False]
    # Each family's prefix has over 260 tokens; the ordered run computes each one about once.
    assert cached[True] >= (len(items) - 2 * len(TOPICS)) * 260


def test_chat_messages_and_input_ids_rows(ray_cluster, tiny_qwen2_path, reference):
    """``messages`` rows go through the chat template (on by default); ``input_ids`` rows are used as given; both
    sorted by prefix (the default) next to each other."""
    chats = [[{"role": "user", "content": f"Say {w}."}] for w in ("yes", "no", "maybe")]
    tok = reference.tokenizer
    ids = [tok.encode(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)) for m in chats]
    expected = [o["output_ids"] for o in reference.generate(input_ids=ids, sampling_params=GREEDY)]
    items = [{"id": i, "messages": m} for i, m in enumerate(chats)] + [{"id": 3, "ids": ids[0]}]

    def preprocess(row: dict) -> dict:
        if row.get("ids") is not None:
            return {"id": row["id"], "input_ids": list(row["ids"]), "sampling_params": GREEDY}
        return {"id": row["id"], "messages": row["messages"], "sampling_params": GREEDY}

    config = ProcessorConfig(engine_kwargs={"model_path": tiny_qwen2_path, "max_total_tokens": 2048})
    rows = build_processor(config, preprocess=preprocess)(ray_data.from_items(items)).take_all()
    got = {r["id"]: list(r["generated_tokens"]) for r in rows}
    assert got == {0: expected[0], 1: expected[1], 2: expected[2], 3: expected[0]}
    assert all(r["num_input_tokens"] == len(ids[r["id"] % 3]) for r in rows)


def test_tool_rows_return_parsed_calls(ray_cluster, tiny_qwen2_path, reference):
    """A row with ``tools`` and ``tool_choice: "required"`` gets the forced call, parsed into ``tool_calls`` (the
    same call the engine gives for the chat path's prompt and grammar); a row without tools gets null."""
    import jsonschema

    from sgl_ray.protocol import ToolFormat, tool_prompt
    from sgl_ray.sampling.params import SamplingParams

    schema = {
        "type": "object",
        # enums: free strings from random weights may hold raw control characters, which JSON does not allow
        "properties": {
            "city": {"enum": ["Paris", "Rome"]},
            "unit": {"enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    }
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": schema}}]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    greedy = {"temperature": 0.0, "max_new_tokens": 96}
    fmt = ToolFormat.for_tokenizer(reference.tokenizer)
    prompt = tool_prompt(
        reference.tokenizer, fmt, ask, tools, SamplingParams(**greedy), tool_choice="required"
    )
    out = reference.generate(input_ids=prompt.input_ids, sampling_params=prompt.params)
    expected = [c._asdict() for c in prompt.parse(out["text"]).calls]
    assert expected
    for call in expected:
        jsonschema.validate(json.loads(call["arguments"]), schema)

    items = [
        {"id": 0, "messages": ask, "tools": json.dumps(tools), "tool_choice": "required"},
        {"id": 1, "messages": ask, "tools": None, "tool_choice": None},
    ]
    config = ProcessorConfig(
        engine_kwargs={"model_path": tiny_qwen2_path, "max_total_tokens": 2048},
        apply_chat_template=True,
        order_by_prefix=False,
    )
    processor = build_processor(config, preprocess=lambda row: {**row, "sampling_params": greedy})
    rows = {r["id"]: r for r in processor(ray_data.from_items(items)).take_all()}
    assert list(rows[0]["tool_calls"]) == expected and rows[0]["generated_text"] == out["text"]
    assert rows[1]["tool_calls"] is None
