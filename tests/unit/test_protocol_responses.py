"""The OpenAI/SGLang wire protocol, responses: shapes compared key-by-key with OpenAI's API reference, stream
assembly, logprob token texts and chat templates."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from jinja2 import TemplateError
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from sgl_ray import protocol as P
from sgl_ray.errors import InvalidRequestError, ModelNotFoundError
from sgl_ray.model_loader import load_tokenizer, resolve_model
from sgl_ray.scheduler.output import RequestOutput
from sgl_ray.tokenizer.detokenizer import IncrementalDetokenizer

from .protocol_helpers import EOS, USER, VOCAB, body_of, chat_request


@pytest.fixture(scope="module")
def tokenizer(smollm2_path: str):
    return load_tokenizer(resolve_model(smollm2_path))


# --- response shapes ----------------------------------------------------------------------------------------------


def _shape(x: Any) -> Any:
    """Keys and value kinds of a JSON document (lists by their first element)."""
    if isinstance(x, dict):
        return {k: _shape(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_shape(x[0])] if x else []
    return "number" if isinstance(x, (int, float)) and not isinstance(x, bool) else type(x).__name__


def _out(rid="r", ids=(), text="", finish=None, prompt=7, done=0, cached=0, lps=None, tops=None, **kw):
    return RequestOutput(
        rid=rid,
        token_ids=list(ids),
        text=text,
        finished=finish is not None,
        finish_reason=finish,
        prompt_tokens=prompt,
        completion_tokens=done,
        cached_tokens=cached,
        output_logprobs=lps,
        output_top_logprobs=tops,
        **kw,
    )


TOP = {"token": "x", "logprob": -0.1, "bytes": [120]}
CHAT_RESPONSE = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hi"},
            "logprobs": {"content": [{**TOP, "top_logprobs": [TOP]}]},
            "finish_reason": "stop",
            "matched_stop": 2,  # SGLang's: the EOS token id that ended it
        }
    ],
    "usage": {
        "prompt_tokens": 7,
        "completion_tokens": 2,
        "total_tokens": 9,
        "prompt_tokens_details": {"cached_tokens": 0},
    },
    "system_fingerprint": "fp",
}


def test_chat_response_shape(tokenizer):
    ids = tokenizer.encode("Hi", add_special_tokens=False)
    assert len(ids) == 1
    texts = P.TokenTexts(tokenizer)
    header = dict(model="m", request_id="chatcmpl-1", created=1, system_fingerprint="fp")
    builder = P.ChatResponseBuilder(logprobs=True, token_texts=texts, **header)
    lps, tops = [(-0.5, ids[0]), (-0.01, EOS)], [[(-0.5, ids[0])], [(-0.01, EOS)]]
    stop = {"type": "stop", "matched": EOS}
    builder.add(0, _out(ids=[ids[0], EOS], text="Hi", finish=stop, done=2, lps=lps, tops=tops))
    doc = json.loads(P.encode(builder.build()))
    assert _shape(doc) == _shape(CHAT_RESPONSE)
    entries = doc["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in entries] == ["Hi"]  # the EOS that ended it is not rendered, nor listed
    plain = P.ChatResponseBuilder(model="m", n=2)
    plain.add(1, _out(text="x", finish={"type": "abort", "message": "gone"}))
    doc = json.loads(P.encode(plain.build()))
    assert doc["choices"][0]["logprobs"] is None and doc["choices"][1]["finish_reason"] == "abort"
    assert "system_fingerprint" not in doc and doc["choices"][0]["message"]["content"] == ""


def test_completion_and_misc_shapes():
    builder = P.CompletionResponseBuilder(model="m", request_id="cmpl-1", created=1)
    builder.add(0, _out(ids=[5], text=" there", finish={"type": "length", "length": 1}, done=1))
    assert json.loads(P.encode(builder.build())) == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [
            {"text": " there", "index": 0, "logprobs": None, "finish_reason": "length", "matched_stop": None}
        ],
        "usage": {
            "prompt_tokens": 7,
            "completion_tokens": 1,
            "total_tokens": 8,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }
    models_doc = json.loads(P.encode(P.ModelList(data=[P.ModelCard(id="smollm2", created=5)])))
    assert models_doc == {
        "object": "list",
        "data": [{"id": "smollm2", "object": "model", "created": 5, "owned_by": "sgl_ray"}],
    }
    engine_result = {
        "text": "a",
        "output_ids": [1],
        "meta_info": {"id": "r", "finish_reason": {"type": "stop"}},
    }
    assert json.loads(P.encode(P.GenerateResponse.from_engine(engine_result))) == engine_result
    assert P.sse_event(P.ModelCard(id="x", created=0)) == (
        b'data: {"id":"x","object":"model","created":0,"owned_by":"sgl_ray"}\n\n'
    )
    assert P.SSE_DONE == b"data: [DONE]\n\n"
    err = ModelNotFoundError("The model 'x' does not exist", param="model", code="model_not_found")
    assert json.loads(P.error_body(err))["error"]["type"] == "not_found_error" and err.status_code == 404
    assert P.sse_error(err) == b"data: " + P.error_body(err) + b"\n\n"
    assert json.loads(P.internal_error_body()) == {
        "error": {"message": "Internal server error", "type": "internal_error", "param": None, "code": None}
    }
    assert P.new_request_id("chatcmpl").startswith("chatcmpl-") and P.now() > 1_600_000_000


# --- streaming ----------------------------------------------------------------------------------------------------


def _engine_deltas(tokenizer, rid: str, text: str, finish: dict, prompt: int, cached: int, top: int):
    """The RequestOutputs an engine emits for ``text`` one token per step (text held back mid-character)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if finish["type"] == "stop":
        ids.append(EOS)
    detok = IncrementalDetokenizer(tokenizer)
    outs = []
    for i, tid in enumerate(ids):
        last = i == len(ids) - 1
        piece = "" if last and finish["type"] == "stop" else detok.step([tid])
        if last:
            piece += detok.flush()
        alts = [(-0.1 - k, (tid + k) % VOCAB) for k in range(top)]
        outs.append(
            _out(rid, [tid], piece, finish if last else None, prompt, i + 1, cached, [(-0.1, tid)], [alts])
        )
    return outs


def _interleave(a: list, b: list) -> list:
    out = []
    for i in range(max(len(a), len(b))):
        out += [x for x in (a[i : i + 1] + b[i : i + 1])]
    return out


TEXTS = ["Hello there! How can I help? 😀", "Hi 👋🏽 — déjà vu"]


def test_chat_stream_n2_interleaved(tokenizer):
    req = chat_request(
        n=2, stream=True, stream_options={"include_usage": True}, logprobs=True, top_logprobs=2
    )
    texts = P.TokenTexts(tokenizer)
    finishes = [{"type": "stop", "matched": EOS}, {"type": "length", "length": 12}]
    a = _engine_deltas(tokenizer, "r-0", TEXTS[0], finishes[0], prompt=30, cached=0, top=2)
    b = _engine_deltas(tokenizer, "r-1", TEXTS[1], finishes[1], prompt=30, cached=29, top=2)
    asm = P.ChatStreamAssembler.from_request(req, model="m", token_texts=texts)
    builder = P.ChatResponseBuilder.from_request(req, model="m", token_texts=texts)
    chunks = []
    for out in _interleave(a, b):
        index = int(out.rid[-1])
        chunks += asm.add(index, out)
        builder.add(index, out)
    assert asm.done
    chunks += asm.finish()
    docs = [json.loads(P.sse_event(c)[len(b"data: ") : -2]) for c in chunks]
    assert all(d["object"] == "chat.completion.chunk" and d["id"] == asm.id and "usage" in d for d in docs)
    assert docs[-1]["choices"] == [] and all(d["usage"] is None for d in docs[:-1])
    full = builder.build()
    for i in (0, 1):
        mine = [d["choices"][0] for d in docs[:-1] if d["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert [c["finish_reason"] for c in mine].count(None) == len(mine) - 1
        finish = {"finish_reason": finishes[i]["type"], "matched_stop": finishes[i].get("matched")}
        assert mine[-1] == {"index": i, "delta": {}, "logprobs": None, **finish}
        content = "".join(c["delta"].get("content", "") for c in mine)
        assert content == TEXTS[i] == full.choices[i].message.content
        entries = [e for c in mine[1:-1] for e in c["logprobs"]["content"]]
        assert len(entries) == len(tokenizer.encode(TEXTS[i], add_special_tokens=False))
        assert (
            bytes(b for e in entries for b in e["bytes"]) == TEXTS[i].encode()
        )  # byte-exact, emoji included
        assert all(len(e["top_logprobs"]) == 2 for e in entries)
        assert entries == msgspec.to_builtins(full.choices[i].logprobs.content)
    completion = len(a) + len(b)
    assert docs[-1]["usage"] == {
        "prompt_tokens": 30,  # the prompt is counted once for both samples
        "completion_tokens": completion,
        "total_tokens": 30 + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert msgspec.to_builtins(full.usage) == docs[-1]["usage"]


def test_chat_stream_without_usage_and_start():
    asm = P.ChatStreamAssembler.from_request(chat_request(stream=True, n=2), model="m")
    first = asm.start()
    assert [c.choices[0].index for c in first] == [0, 1] and asm.start() == []
    chunks = asm.add(1, _out(text="ok", finish={"type": "length", "length": 1}, done=1))
    docs = [json.loads(P.encode(c)) for c in chunks]
    assert [d["choices"][0]["delta"] for d in docs] == [{"content": "ok"}, {}]
    assert all("usage" not in d for d in docs) and asm.finish() == [] and not asm.done
    with pytest.raises(ValueError, match="already finished"):
        asm.add(1, _out(text="more"))
    with pytest.raises(ValueError, match="outside"):
        asm.add(2, _out(text="x"))


def test_completion_stream_echo_logprobs(tokenizer):
    prompt_ids = tokenizer.encode("The sky is", add_special_tokens=False)
    req = P.decode_request(
        "completion",
        body_of(
            prompt=["The sky is"],
            n=2,
            echo=True,
            logprobs=1,
            stream=True,
            stream_options={"include_usage": True},
        ),
    )
    inputs = [(None, prompt_ids[0])] + [(-1.5, t) for t in prompt_ids[1:]]
    in_tops = [[]] + [[(-1.0, t)] for t in prompt_ids[1:]]
    texts = P.TokenTexts(tokenizer)
    asm = P.CompletionStreamAssembler.from_request(req, model="m", token_texts=texts)
    builder = P.CompletionResponseBuilder.from_request(req, model="m", token_texts=texts)
    outs = {
        i: _engine_deltas(tokenizer, f"r-{i}", " blue.", {"type": "length", "length": 2}, 3, 0, 1)
        for i in (0, 1)
    }
    for i in (0, 1):  # the prefill step returns the prompt logprobs with the first token
        outs[i][0].input_logprobs, outs[i][0].input_top_logprobs = inputs, in_tops
    chunks = []
    for i, out in [(0, outs[0][0]), (1, outs[1][0]), (1, outs[1][1]), (0, outs[0][1])]:
        chunks += asm.add(i, out)
        builder.add(i, out)
    chunks += asm.finish()
    docs = [json.loads(P.encode(c)) for c in chunks]
    assert all(d["object"] == "text_completion" for d in docs) and docs[-1]["usage"]["prompt_tokens"] == 3
    full = json.loads(P.encode(builder.build()))
    for i in (0, 1):
        mine = [d["choices"][0] for d in docs[:-1] if d["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == "The sky is blue." == full["choices"][i]["text"]
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + ["length"]
        lp = full["choices"][i]["logprobs"]
        assert lp["tokens"][: len(prompt_ids)] == [texts(t)[0] for t in prompt_ids]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        pairs = zip(lp["tokens"][1:], lp["top_logprobs"][1:], strict=True)
        assert all(len(top) <= 2 and tok in top for tok, top in pairs)
        assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
        streamed = [t for c in mine if c["logprobs"] for t in c["logprobs"]["tokens"]]
        assert streamed == lp["tokens"]


def test_completion_multiple_prompts_usage():
    builder = P.CompletionResponseBuilder(model="m", n=2, num_prompts=2)
    for i, prompt in enumerate([4, 4, 9, 9]):
        builder.add(
            i, _out(text=str(i), finish={"type": "length"}, prompt=prompt, done=1, cached=4 - i % 2 * 4)
        )
    usage = builder.build().usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.prompt_tokens_details.cached_tokens) == (
        13,
        4,
        0,
    )


# --- logprobs and token texts -------------------------------------------------------------------------------------


def test_token_texts_byte_level(tokenizer):
    texts = P.TokenTexts(tokenizer)
    ids = tokenizer.encode("héllo 😀", add_special_tokens=False)
    assert bytes(b for t in ids for b in texts(t)[1]) == "héllo 😀".encode()
    assert [texts(t)[0] for t in ids] == [tokenizer.decode([t]) for t in ids]
    assert texts(EOS) == ("<|im_end|>", list(b"<|im_end|>"))
    entry = P.chat_logprob_entries(texts, [(float("-inf"), ids[0])], [[(float("-inf"), ids[1])]])[0]
    assert entry.logprob == -9999.0 and entry.top_logprobs[0].logprob == -9999.0


def test_token_texts_sentencepiece():
    vocab = {"<unk>": 0, "▁Hello": 1, "<0xF0>": 2, "<0x9F>": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    texts = P.TokenTexts(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>"))
    assert texts(1) == (" Hello", list(b" Hello")) and texts(4) == ("world", list(b"world"))
    assert texts(2) == ("\ufffd", [0xF0])


# --- chat templates -----------------------------------------------------------------------------------------------


def test_render_chat_matches_apply_chat_template(tokenizer):
    conversations = [
        [USER],
        [{"role": "system", "content": "Be brief."}, USER, {"role": "assistant", "content": "Hi."}, USER],
    ]
    for conv in conversations:
        req = chat_request(messages=conv)
        expected = tokenizer.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert P.render_chat(tokenizer, req.messages) == list(expected)
        assert P.render_chat(tokenizer, conv) == list(expected)
    parts = chat_request(
        messages=[{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}, USER]
    )
    assert P.render_chat(tokenizer, parts.messages, add_generation_prompt=False) == P.render_chat(
        tokenizer, conversations[1][:2], add_generation_prompt=False
    )


def test_render_chat_errors():
    class NoTemplate:
        chat_template = None

    class Raising:
        chat_template = "{{ raise_exception('roles must alternate') }}"

        def apply_chat_template(self, *args, **kwargs):
            raise TemplateError("roles must alternate")

    for tok, match in [(NoTemplate(), "no chat template"), (Raising(), "roles must alternate")]:
        with pytest.raises(InvalidRequestError, match=match) as info:
            P.render_chat(tok, [USER])
        assert info.value.param == "messages"
