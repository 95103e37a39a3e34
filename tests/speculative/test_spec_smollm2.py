"""NGRAM on the real default model (SmolLM2-135M-Instruct): on copy-heavy prompts most drafts are accepted, and
greedy and seeded outputs are token-identical to the same engine without speculation — also with a stop string
inside an accepted run and under a JSON schema (drafts cut at the first token the grammar rejects)."""

from __future__ import annotations

import json

import pytest

import sgl_ray

TEXTS = [
    "The meeting is scheduled for Monday at ten in the morning in the main conference room.",
    "The cat sat on the mat and looked out of the window at the birds in the garden.",
    "To be, or not to be, that is the question: whether it is nobler in the mind to suffer.",
]


@pytest.fixture(scope="module")
def pair(smollm2_path):
    """(without speculation, with NGRAM): the same model and pool."""
    with (
        sgl_ray.Engine(smollm2_path, max_total_tokens=4096) as plain,
        sgl_ray.Engine(
            smollm2_path, max_total_tokens=4096, speculative_algorithm="NGRAM", speculative_num_draft_tokens=8
        ) as ngram,
    ):
        yield plain, ngram


def _chat(engine, text: str) -> list[int]:
    messages = [{"role": "user", "content": f"Repeat the following text exactly:\n{text}"}]
    prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return engine.tokenizer.encode(prompt, add_special_tokens=False)


def _restored(engine) -> bool:
    engine.flush_cache()
    stats = engine.get_stats()
    return stats["kv_free"] == stats["kv_capacity"]


def test_copying_is_identical_and_mostly_accepted(pair):
    plain, ngram = pair
    prompts = [_chat(plain, t) for t in TEXTS]
    greedy = {"temperature": 0, "max_new_tokens": 40}
    want = plain.generate(input_ids=prompts, sampling_params=greedy)
    got = ngram.generate(input_ids=prompts, sampling_params=greedy)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert [o["text"] for o in got] == [o["text"] for o in want]
    meta = [o["meta_info"] for o in got]
    assert sum(m["spec_accepted_drafts"] for m in meta) > 0.6 * sum(m["spec_proposed_drafts"] for m in meta)
    assert all(m["spec_accept_length"] > 2 for m in meta)
    assert ngram.get_stats()["spec_accept_length"] > 2
    assert _restored(ngram)


def test_seeded_sampling_is_identical(pair):
    plain, ngram = pair
    ids = _chat(plain, TEXTS[0])
    params = {"temperature": 0.7, "top_k": 40, "max_new_tokens": 32, "seed": 1234, "n": 2}
    want = plain.generate(input_ids=ids, sampling_params=params)
    got = ngram.generate(input_ids=ids, sampling_params=params)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert sum(o["meta_info"]["spec_accepted_drafts"] for o in got) > 0
    assert _restored(ngram)


def test_stop_string_inside_an_accepted_run(pair):
    plain, ngram = pair
    ids = _chat(plain, TEXTS[2])
    params = {"temperature": 0, "max_new_tokens": 40, "stop": ["nobler"]}
    want = plain.generate(input_ids=ids, sampling_params=params)
    got = ngram.generate(input_ids=ids, sampling_params=params)
    assert want["meta_info"]["finish_reason"] == {"type": "stop", "matched": "nobler"}
    assert got["text"] == want["text"] and got["output_ids"] == want["output_ids"]
    assert got["meta_info"]["finish_reason"] == want["meta_info"]["finish_reason"]
    # the request ended inside a run of accepted drafts, not at the end of one
    assert got["meta_info"]["spec_accepted_drafts"] > 0
    assert _restored(ngram)


def test_json_schema(pair):
    """Drafts are checked against the grammar before the step (cut at the first token it rejects), and the rows of
    a verify step sample under the grammar's mask after each draft."""
    plain, ngram = pair
    schema = {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "color": {"type": "string"}},
                    "required": ["name", "color"],
                },
                "minItems": 3,
                "maxItems": 3,
            }
        },
        "required": ["items"],
    }
    messages = [{"role": "user", "content": "List three fruits with their color as JSON."}]
    prompt = plain.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    params = {"temperature": 0, "max_new_tokens": 80, "json_schema": json.dumps(schema)}
    want = plain.generate(prompt, params)
    got = ngram.generate(prompt, params)
    assert got["output_ids"] == want["output_ids"]
    assert len(json.loads(got["text"])["items"]) == 3
    assert got["meta_info"]["spec_proposed_drafts"] > 0
    assert _restored(ngram)
