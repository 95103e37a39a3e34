"""The official ``openai`` client against a real Serve app of the tiny Qwen2-VL on two tensor-parallel shard
actors: an ``image_url`` part with a ``data:`` URL gives transformers' greedy tokens (twice: the second time from
the prefix cache), and a bad image is a 400 naming the part. The app (``vision_client``, in conftest.py) is
shared with test_vision_http.py."""

from __future__ import annotations

import pytest

from .test_qwen2_vl import MAX_NEW, hf_greedy, reference  # noqa: F401  (the module's reference fixture)
from .test_vision_requests import data_url
from .tiny_vl import IMAGE, draw

pytestmark = [pytest.mark.serve, pytest.mark.slow]


def test_openai_chat_with_a_data_url(vision_client, reference) -> None:  # noqa: F811
    image = draw(3)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": data_url(image)}},
            ],
        }
    ]
    replies = [
        vision_client.chat.completions.create(
            model="vl", messages=messages, max_tokens=MAX_NEW, temperature=0, extra_body={"ignore_eos": True}
        )
        for _ in range(2)
    ]
    reply = replies[0]
    tokenizer = reference[2]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"What is this?\n{IMAGE}"}], add_generation_prompt=True, tokenize=False
    )
    want = tokenizer.decode(hf_greedy(reference, text, [image]), skip_special_tokens=True)
    assert [r.choices[0].message.content for r in replies] == [want, want]
    assert reply.usage.prompt_tokens > len(tokenizer.encode(text))  # the image's tokens count
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in replies]
    assert cached[0] == 0 and cached[1] == reply.usage.prompt_tokens - 1  # through the image


def test_openai_bad_image_is_a_400(vision_client) -> None:
    import openai

    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
        }
    ]
    with pytest.raises(openai.BadRequestError) as err:
        vision_client.chat.completions.create(model="vl", messages=messages, max_tokens=2)
    assert err.value.body["param"] == "messages[0].content[0]"
    assert "cannot decode the image" in err.value.body["message"]
