"""Images through the ingress's preprocessing: OpenAI ``image_url`` parts with ``data:`` URLs and native
``/generate``'s ``image_data`` become prompts that carry their images, which a replica's engine runs; bad parts are
400s naming the part."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import msgspec
import pytest

import sgl_ray
from sgl_ray import protocol as P
from sgl_ray.deployments.preprocess import Preprocessor
from sgl_ray.model_loader import load_hf_config, load_tokenizer, resolve_model
from sgl_ray.multimodal import InvalidImageError
from sgl_ray.multimodal.chat import ImagePrompt, IngressImages

from .test_qwen2_vl import GREEDY, hf_greedy, reference  # noqa: F401  (the module's reference fixture)
from .tiny_vl import IMAGE, draw


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def preprocessor(path: str, images: bool = True, allowed_local_media_path: str | None = None) -> Preprocessor:
    source = resolve_model(path)
    hf_config = load_hf_config(source)
    tokenizer = load_tokenizer(source)
    ingress_images = IngressImages.for_model(hf_config, source.local_dir, allowed_local_media_path)
    return Preprocessor(
        tokenizer,
        P.RequestLimits.for_context(4096),
        context_length=4096,
        vocab_size=hf_config.vocab_size,
        tool_parser=None,
        reasoning_parser=None,
        calls_as_text=None,
        images=ingress_images if images else None,
    )


@pytest.fixture(scope="module")
def pre(qwen2_vl_path: str) -> Preprocessor:
    return preprocessor(qwen2_vl_path)


def chat_body(*parts: dict) -> bytes:
    messages = [{"role": "user", "content": list(parts)}]
    return json.dumps(
        {"messages": messages, "max_tokens": GREEDY["max_new_tokens"], "temperature": 0}
    ).encode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


async def _run(llm: sgl_ray.Engine, ids: list[int], params) -> list[int]:
    tokens: list[int] = []
    async for _, out in llm.astream_outputs(ids, params, multimodal=getattr(ids, "multimodal", None)):
        tokens.extend(out.token_ids)
    return tokens


def test_chat_image_url_part_runs_like_the_reference(pre, qwen2_vl_path: str, reference) -> None:  # noqa: F811
    image = draw(6)
    req = P.decode_request("chat", chat_body({"type": "text", "text": "Look"}, image_part(data_url(image))))
    ids, params, _ = pre.chat(req)
    assert isinstance(ids, ImagePrompt) and len(ids.multimodal.images) == 1
    text = pre.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Look\n{IMAGE}"}], add_generation_prompt=True, tokenize=False
    )
    with sgl_ray.Engine(qwen2_vl_path) as llm:
        got = asyncio.run(_run(llm, ids, msgspec.structs.replace(params, ignore_eos=True)))
    assert got == hf_greedy(reference, text, [image])


def test_generate_image_data(pre) -> None:
    body = {"text": [f"A {IMAGE}", "plain"], "image_data": [data_url(draw(1)), None]}
    ((prompts, _),) = pre.generate(P.decode_request("generate", json.dumps(body).encode())).calls
    assert isinstance(prompts[0], ImagePrompt) and not isinstance(prompts[1], ImagePrompt)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("data:image/png;base64,AAAA", "cannot decode the image"),
        ("data:image/png;base64,%%%", "not valid base64"),
        ("http://127.0.0.1:9/x.png", "cannot fetch"),  # nothing listens on the discard port
        ("file:///etc/hostname", "local files are not read here"),
        ("", "needs image_url.url"),
    ],
)
def test_bad_image_parts_are_400s_naming_the_part(pre, url: str, message: str) -> None:
    req = P.decode_request("chat", chat_body({"type": "text", "text": "hi"}, image_part(url)))
    with pytest.raises(InvalidImageError, match=message) as err:
        pre.chat(req)
    assert err.value.status_code == 400 and err.value.param == "messages[0].content[1]"
    assert json.loads(P.error_body(err.value))["error"]["param"] == "messages[0].content[1]"


def test_text_model_refuses_image_parts(qwen2_vl_path: str) -> None:
    pre = preprocessor(qwen2_vl_path, images=False)
    req = P.decode_request("chat", chat_body(image_part(data_url(draw(1)))))
    with pytest.raises(InvalidImageError, match="takes no image inputs") as err:
        pre.chat(req)
    assert err.value.param == "messages[0].content[0]"


def test_too_many_image_parts_is_a_400(pre) -> None:
    parts = [image_part(data_url(draw(1)))] * 17
    with pytest.raises(InvalidImageError, match="17 images, over the limit of 16") as err:
        pre.chat(P.decode_request("chat", chat_body(*parts)))
    assert err.value.status_code == 400 and err.value.param == "messages"


def test_local_files_only_under_the_allowed_path(qwen2_vl_path: str, tmp_path) -> None:
    """With ``allowed_local_media_path`` a ``file://`` part under it reads like the same image's ``data:`` URL;
    one outside it is a 400."""
    media = tmp_path / "media"
    media.mkdir()
    draw(2).save(media / "two.png")
    pre = preprocessor(qwen2_vl_path, allowed_local_media_path=str(media))
    by_file, _, _ = pre.chat(P.decode_request("chat", chat_body(image_part(f"file://{media / 'two.png'}"))))
    by_url, _, _ = pre.chat(P.decode_request("chat", chat_body(image_part(data_url(draw(2))))))
    assert list(by_file) == list(by_url)
    assert [im.hash for im in by_file.multimodal.images] == [im.hash for im in by_url.multimodal.images]
    draw(3).save(tmp_path / "outside.png")
    for url in (f"file://{tmp_path / 'outside.png'}", f"file://{media}/../outside.png"):
        with pytest.raises(InvalidImageError, match="only read under the allowed media path") as err:
            pre.chat(P.decode_request("chat", chat_body(image_part(url))))
        assert err.value.param == "messages[0].content[0]"
