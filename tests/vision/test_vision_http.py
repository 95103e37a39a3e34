"""``http(s)`` image URLs against a local HTTP server on 127.0.0.1 (a PNG drawn with PIL, redirects, a 404, a slow
endpoint, an oversized body, non-image bytes): fetched by the ingress's preprocessing and by the in-process
processor, each bad case a 400 naming the part; the official ``openai`` client against the Serve app; and the
router's image-keyed prefix hashes against a real engine's radix summary."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import sgl_ray
from sgl_ray import protocol as P
from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.deployments.preprocess import Preprocessor
from sgl_ray.deployments.router import PREFIX_BLOCK, rank_replicas
from sgl_ray.errors import InvalidRequestError
from sgl_ray.mem_cache.prefix_hash import block_hashes
from sgl_ray.model_loader import load_hf_config, load_tokenizer, resolve_model
from sgl_ray.multimodal import ImageLimits, InvalidImageError
from sgl_ray.multimodal.chat import ImagePrompt, IngressImages
from sgl_ray.multimodal.inputs import image_key_id, load_image
from sgl_ray.multimodal.processor import create_processor

from .test_qwen2_vl import MAX_NEW, hf_greedy, reference  # noqa: F401  (the module's reference fixture)
from .test_vision_requests import chat_body, data_url, image_part
from .tiny_vl import IMAGE, draw

LIMIT = 64 * 1024  # max_image_bytes of these tests (the drawn PNGs are ~1 KB)


def png(kind: int) -> bytes:
    buffer = io.BytesIO()
    draw(kind).save(buffer, format="PNG")
    return buffer.getvalue()


class ImageServer(ThreadingHTTPServer):
    """``/cat.png`` and ``/dog.png`` (two drawn images), ``/redirect`` (to ``/cat.png``), ``/chain/N`` (N redirects
    to ``/cat.png``), ``/to-file`` (a redirect to a ``file:`` URL), ``/to-host`` (a redirect to ``/cat.png`` on
    ``localhost``), ``/missing`` (404), ``/slow`` (answers only once the test ends), ``/huge`` (more than
    ``LIMIT`` bytes, without a Content-Length), ``/text`` (not an image), ``/pair/*`` (answers once two of them
    are waiting: fetched one after the other they never would)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.release = threading.Event()
        self.pair = threading.Barrier(2)
        self.images = {"/cat.png": png(5), "/dog.png": png(6)}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address) -> None:  # a client that gave up: nothing to report
        pass


class _Handler(BaseHTTPRequestHandler):
    server: ImageServer

    def do_GET(self) -> None:  # noqa: N802  (http.server's name)
        path, port = self.path, self.server.server_address[1]
        if path in self.server.images:
            self._send(200, self.server.images[path], "image/png")
        elif path == "/redirect":
            self._redirect("/cat.png")
        elif path.startswith("/chain/"):
            left = int(path.rsplit("/", 1)[1])
            self._redirect(f"/chain/{left - 1}" if left > 1 else "/cat.png")
        elif path == "/to-file":
            self._redirect("file:///etc/passwd")
        elif path == "/to-host":
            self._redirect(f"http://localhost:{port}/cat.png")
        elif path == "/slow":
            self.server.release.wait(30)
            self._send(200, self.server.images["/cat.png"], "image/png")
        elif path == "/huge":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()  # HTTP/1.0, no Content-Length: the body ends when the connection closes
            chunk = b"\x89PNG" + bytes(16 * 1024)
            for _ in range(4 * LIMIT // len(chunk)):
                self.wfile.write(chunk)
        elif path == "/text":
            self._send(200, b"hello, this is not an image", "text/plain")
        elif path.startswith("/pair/"):
            self.server.pair.wait(10)
            self._send(200, self.server.images["/dog.png"], "image/png")
        else:
            self._send(404, b"not found", "text/plain")

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def images_at() -> Iterator[ImageServer]:
    server = ImageServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pre(qwen2_vl_path: str) -> Preprocessor:
    """The ingress's preprocessing of the tiny Qwen2-VL, with the limits these tests probe."""
    source = resolve_model(qwen2_vl_path)
    hf_config = load_hf_config(source)
    limits = ImageLimits.for_server(fetch_timeout_s=1.0, max_image_bytes=LIMIT, max_redirects=3)
    return Preprocessor(
        load_tokenizer(source),
        P.RequestLimits.for_context(4096),
        context_length=4096,
        vocab_size=ModelConfig(hf_config, torch.float32, None).vocab_size,  # as ServedModel does
        tool_parser=None,
        reasoning_parser=None,
        calls_as_text=None,
        images=IngressImages.for_model(hf_config, source.local_dir, limits=limits),
    )


def chat(pre: Preprocessor, *urls: str) -> ImagePrompt:
    """The prompt of a chat request with a text part and these image parts, fetched as the ingress does."""
    req = P.decode_request("chat", chat_body({"type": "text", "text": "hi"}, *map(image_part, urls)))
    fetched = asyncio.run(pre.fetch_images(req))
    ids, _, _ = pre.chat(req, fetched)
    return ids


def same_prompt(a: ImagePrompt, b: ImagePrompt) -> bool:
    hashes = [[im.hash for im in p.multimodal.images] for p in (a, b)]
    return list(a) == list(b) and hashes[0] == hashes[1]


# --- the fetch, through the ingress's preprocessing ---------------------------------------------------------------


def test_http_url_reads_like_the_data_url(pre, images_at) -> None:
    by_url = chat(pre, f"{images_at.url}/cat.png")
    assert same_prompt(by_url, chat(pre, data_url(draw(5))))
    assert same_prompt(chat(pre, f"{images_at.url}/redirect"), by_url)
    assert same_prompt(chat(pre, f"{images_at.url}/chain/3"), by_url)  # max_redirects
    assert not same_prompt(chat(pre, f"{images_at.url}/dog.png"), by_url)


def test_images_of_a_request_are_fetched_concurrently(pre, images_at) -> None:
    """``/pair/*`` answers only once two requests wait there; the same URL twice is fetched once."""
    req = P.decode_request(
        "chat",
        chat_body(*(image_part(f"{images_at.url}/pair/{k}") for k in "aab")),
    )
    fetched = asyncio.run(pre.fetch_images(req))
    assert sorted(fetched) == [f"{images_at.url}/pair/a", f"{images_at.url}/pair/b"]
    ids, _, _ = pre.chat(req, fetched)
    assert len(ids.multimodal.images) == 3


BAD = {
    "404": ("/missing", "returned HTTP 404"),
    "slow": ("/slow", "took longer than 1 s"),
    "too large": ("/huge", f"over the limit of {LIMIT} bytes"),
    "not an image": ("/text", "cannot decode the image (not a known image format)"),
    "redirect to file:": ("/to-file", "only http(s) image URLs are fetched, not file:"),
    "too many redirects": ("/chain/4", "more than 3 redirects"),
    "unreachable": (None, "cannot fetch http://127.0.0.1:"),
}


def bad_url(images_at: ImageServer, case: str) -> str:
    path = BAD[case][0]
    return f"http://127.0.0.1:{closed_port()}/cat.png" if path is None else images_at.url + path


@pytest.mark.parametrize("case", list(BAD))
def test_bad_urls_are_400s_naming_the_part(pre, images_at, case: str) -> None:
    with pytest.raises(InvalidImageError) as err:
        chat(pre, data_url(draw(1)), bad_url(images_at, case))
    assert BAD[case][1] in err.value.message
    assert err.value.status_code == 400 and err.value.param == "messages[0].content[2]"
    assert err.value.message.startswith("messages[0].content[2]: ")


def test_allowed_media_domains_hold_for_every_redirect(qwen2_vl_path: str, images_at) -> None:
    hf_config = load_hf_config(resolve_model(qwen2_vl_path))
    limits = ImageLimits.for_server(allowed_media_domains=("127.0.0.1",))
    processor = create_processor(hf_config, qwen2_vl_path, limits)
    ids = [hf_config.image_token_id]
    processor.process(ids, [f"{images_at.url}/redirect"])  # redirected on the same host
    with pytest.raises(InvalidImageError, match="not fetched from localhost") as err:
        processor.process(ids, [f"{images_at.url}/to-host"])
    assert err.value.param == "image_data[0]"
    far = create_processor(hf_config, qwen2_vl_path, ImageLimits.for_server(allowed_media_domains=()))
    with pytest.raises(InvalidImageError, match="not fetched from 127.0.0.1"):
        far.process(ids, [f"{images_at.url}/cat.png"])


def test_generate_image_data_urls(pre, images_at) -> None:
    """Native ``/generate``: one prompt's list and a batch's per-prompt entries, named as the processor names
    them."""

    def generate(image_data) -> list:
        body = {"text": [f"A {IMAGE}", f"B {IMAGE}{IMAGE}"], "image_data": image_data}
        req = P.decode_request("generate", json.dumps(body).encode())
        return pre.generate(req, asyncio.run(pre.fetch_images(req))).calls[0][0]

    at = images_at.url
    by_url = generate([f"{at}/cat.png", [f"{at}/dog.png", f"{at}/redirect"]])
    by_data = generate([data_url(draw(5)), [data_url(draw(6)), data_url(draw(5))]])
    assert all(same_prompt(a, b) for a, b in zip(by_url, by_data, strict=True))
    with pytest.raises(InvalidImageError, match="HTTP 404") as err:
        generate([f"{at}/cat.png", [f"{at}/dog.png", f"{at}/missing"]])
    assert err.value.param == "image_data[1][1]"
    one = {"text": f"A {IMAGE}", "image_data": f"{at}/text"}
    req = P.decode_request("generate", json.dumps(one).encode())
    with pytest.raises(InvalidImageError, match="cannot decode") as err:
        pre.generate(req, asyncio.run(pre.fetch_images(req)))
    assert err.value.param == "image_data[0]"


def test_too_many_images_are_refused_before_any_fetch(pre, images_at) -> None:
    parts = [image_part(f"{images_at.url}/slow")] * 17  # fetched, they would take the whole timeout
    with pytest.raises(InvalidImageError, match="17 images, over the limit of 16") as err:
        asyncio.run(pre.fetch_images(P.decode_request("chat", chat_body(*parts))))
    assert err.value.param == "messages"


def test_in_process_engine_reads_http_urls(images_at) -> None:
    """``Engine.generate(image_data=url)``'s path: ``load_image`` fetches on the caller's thread, also where that
    thread runs an event loop."""
    want = load_image(draw(5), ImageLimits(), "image_data[0]")
    got = load_image(f"{images_at.url}/redirect", ImageLimits(), "image_data[0]")
    assert got.size == want.size and got.tobytes() == want.tobytes()

    async def in_a_loop():
        return load_image(f"{images_at.url}/cat.png", ImageLimits(), "image_data[0]")

    assert asyncio.run(in_a_loop()).tobytes() == want.tobytes()
    with pytest.raises(InvalidImageError, match="HTTP 404"):
        load_image(f"{images_at.url}/missing", ImageLimits(), "image_data[0]")


def test_app_options() -> None:
    from sgl_ray.cli import build_parser
    from sgl_ray.deployments.app import build_openai_app
    from sgl_ray.deployments.serve_cli import app_args

    flags = "--allowed-media-domains example.com cdn.example.com --image-fetch-timeout-s 2.5"
    flags += " --image-fetch-max-redirects 0 --max-image-bytes 1000 --max-images-per-prompt 2"
    args = app_args(build_parser().parse_args(["serve", *flags.split()]))
    limits = ImageLimits.from_options(args)
    assert limits.allowed_media_domains == ("example.com", "cdn.example.com")
    assert (limits.fetch_timeout_s, limits.max_redirects, limits.max_image_bytes, limits.max_images) == (
        2.5,
        0,
        1000,
        2,
    )
    assert not limits.allow_local_files
    for bad in (
        {"image_fetch_timeout_s": 0},
        {"image_fetch_max_redirects": -1},
        {"max_image_bytes": 1.5},
        {"max_images_per_prompt": 0},
        {"allowed_media_domains": "example.com"},
    ):
        with pytest.raises(InvalidRequestError, match=next(iter(bad))):  # before any replica starts
            build_openai_app({"model_path": "unused", **bad})


# --- the router: images keyed as the radix cache keys them ------------------------------------------------------

LONG = (
    f"<|im_start|>user\n{IMAGE} Describe the picture in great detail, naming every shape and every colour that "
    "you can see in it, and where each one is.<|im_end|>\n<|im_start|>assistant\n"
)


def generate_prompt(pre: Preprocessor, image) -> ImagePrompt:
    body = {"text": LONG, "image_data": data_url(image)}
    ((prompts, _),) = pre.generate(P.decode_request("generate", json.dumps(body).encode())).calls
    return prompts[0]


def test_router_keys_images_like_the_radix_cache(pre, qwen2_vl_path: str, images_at) -> None:
    same, again, other = (generate_prompt(pre, draw(k)) for k in (5, 5, 6))
    assert len(same) > PREFIX_BLOCK and same.multimodal.images[0].offset + 6 < PREFIX_BLOCK  # in block 0
    keys = same.cache_ids()
    assert keys == again.cache_ids() and keys != other.cache_ids()
    image = same.multimodal.images[0]
    key = image_key_id(image.hash, pre.vocab_size)
    assert keys[image.offset : image.offset + image.num_tokens] == [key] * image.num_tokens
    assert key >= pre.vocab_size and [k for k in keys if k >= pre.vocab_size] == [key] * image.num_tokens
    # a replica that served the image publishes the hashes the router computes for it
    with sgl_ray.Engine(qwen2_vl_path, page_size=1) as llm:
        llm.generate(LONG, {"temperature": 0, "max_new_tokens": 1}, image_data=draw(5))
        summary = llm.prefix_summary(PREFIX_BLOCK)
        # the in-process engine fetches a URL itself; the same pixels hit the cache through the image
        out = llm.generate(LONG, {"max_new_tokens": 1}, image_data=f"{images_at.url}/cat.png")
        assert out["meta_info"]["cached_tokens"] == out["meta_info"]["prompt_tokens"] - 1 == len(keys) - 1
    assert set(block_hashes(keys, PREFIX_BLOCK)) <= summary
    stats = {"served": {"prefix_blocks": summary, "num_running": 1}, "idle": {}}
    assert rank_replicas(stats, {"prompts": [again]}, 8) == ([["served"], ["idle"]], "cache")
    assert rank_replicas(stats, {"prompts": [other]}, 8)[1] == "load"  # another image: no shared prefix
    assert rank_replicas(stats, {"prompts": [list(again)]}, 8)[1] == "load"  # placeholder ids never match


# --- the Serve app ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vision_app(vision_client):
    """The shared vision app's client; its prefix cache is flushed afterwards (the other tests count hits)."""
    yield vision_client
    base = str(vision_client.base_url).removesuffix("/").removesuffix("/v1")
    urllib.request.urlopen(urllib.request.Request(f"{base}/flush_cache", b"", method="POST"), timeout=60)


def post_generate(client, body: dict) -> dict:
    base = str(client.base_url).removesuffix("/").removesuffix("/v1")
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(f"{base}/generate", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())


@pytest.mark.serve
@pytest.mark.slow
def test_openai_chat_with_an_http_url(vision_app, images_at, reference) -> None:  # noqa: F811
    def ask(url: str):
        parts = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]
        return vision_app.chat.completions.create(
            model="vl",
            messages=[{"role": "user", "content": parts}],
            max_tokens=MAX_NEW,
            temperature=0,
            extra_body={"ignore_eos": True},
        )

    by_url, by_data = ask(f"{images_at.url}/redirect"), ask(data_url(draw(5)))
    tokenizer = reference[2]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"What is this?\n{IMAGE}"}], add_generation_prompt=True, tokenize=False
    )
    want = tokenizer.decode(hf_greedy(reference, text, [draw(5)]), skip_special_tokens=True)
    assert by_url.choices[0].message.content == by_data.choices[0].message.content == want
    # the fetched image keys the prefix cache as the same image sent inline does
    assert by_data.usage.prompt_tokens_details.cached_tokens == by_data.usage.prompt_tokens - 1


@pytest.mark.serve
@pytest.mark.slow
def test_bad_urls_over_http_are_400s_and_the_app_keeps_serving(vision_app, images_at) -> None:
    import openai

    for case in BAD:
        url = bad_url(images_at, case)
        parts = [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]
        with pytest.raises(openai.BadRequestError) as err:
            vision_app.chat.completions.create(
                model="vl", messages=[{"role": "user", "content": parts}], max_tokens=2
            )
        assert err.value.status_code == 400, case
        assert err.value.body["param"] == "messages[0].content[1]", case
        assert BAD[case][1] in err.value.body["message"], case
    # native /generate: an http URL after all that, then a bad one
    body = {
        "text": f"A {IMAGE}",
        "image_data": f"{images_at.url}/cat.png",
        "sampling_params": {"max_new_tokens": 2},
    }
    assert post_generate(vision_app, body)["meta_info"]["prompt_tokens"] > 6  # the image's tokens count
    with pytest.raises(urllib.error.HTTPError) as err:
        post_generate(vision_app, {**body, "image_data": f"{images_at.url}/missing"})
    assert err.value.code == 400
    assert json.loads(err.value.read())["error"]["param"] == "image_data[0]"
