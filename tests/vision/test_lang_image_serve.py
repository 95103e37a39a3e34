"""The frontend language's ``image()`` programs over the vision tests' Serve app (the tiny Qwen2-VL, TP=2):
``RuntimeEndpoint`` and the OpenAI chat backend run the programs of ``tests/lang/test_lang_image.py`` and equal
transformers' ``Qwen2VLForConditionalGeneration`` on the same weights."""

from __future__ import annotations

import urllib.request

import pytest

import sgl_ray.lang as sgl

from ..lang.test_lang_image import QUESTION, chat_text, check_describe, check_pick, describe, pick_program
from .test_qwen2_vl import MAX_NEW, hf_greedy, reference  # noqa: F401  (the module's reference fixture)
from .tiny_vl import IMAGE, draw


@pytest.fixture(scope="module")
def vision_url(vision_app_url: str):
    """The vision tests' Serve app; its prefix cache is flushed afterwards (other tests count hits)."""
    yield vision_app_url
    urllib.request.urlopen(
        urllib.request.Request(f"{vision_app_url}/flush_cache", b"", method="POST"), timeout=60
    )


@pytest.mark.serve
@pytest.mark.ray
@pytest.mark.slow
def test_image_programs_over_http_match_transformers(vision_url: str, reference) -> None:  # noqa: F811
    """``RuntimeEndpoint`` (``/generate`` with ``image_data``, ``/tokenize`` + prompt logprobs for ``select``)
    runs the same programs as in process; the OpenAI chat backend sends the image as an ``image_url`` part, which
    the server renders as its placeholder on a line of its own."""
    endpoint = sgl.RuntimeEndpoint(vision_url)
    assert endpoint.role_format().image_token == IMAGE  # from /get_model_info
    image = draw(3)
    check_describe(describe.run(image, backend=endpoint, temperature=0), reference, image)
    branches: list = []
    check_pick(
        pick_program(branches).run(image, backend=endpoint, temperature=0), branches[0], reference, image
    )

    @sgl.function
    def ask(s, picture):
        s += sgl.user(sgl.image(picture) + QUESTION)
        s += sgl.assistant(sgl.gen("answer", max_tokens=MAX_NEW, ignore_eos=True))

    chat = sgl.OpenAI("vl", base_url=f"{vision_url}/v1", max_retries=0)
    state = ask.run(image, backend=chat, temperature=0)
    tok = reference[2]
    want = hf_greedy(reference, chat_text(tok, [("user", f"{IMAGE}\n{QUESTION}")]), [image])
    assert state["answer"] == tok.decode(want, skip_special_tokens=True)
    assert state.get_meta_info("answer")["prompt_tokens"] > len(tok.encode(chat_text(tok, [("user", IMAGE)])))
