"""``image()`` in programs on the tiny random-weight Qwen2-VL: greedy ``gen`` after an image, a later ``gen`` that
still sends it, forks that share it and ``select`` scored with it all equal transformers'
``Qwen2VLForConditionalGeneration`` on the same weights, in process (over the Serve app: in
``tests/vision/test_lang_image_serve.py``, on the vision tests' app); every image source gives the same tokens; the
errors are typed."""

from __future__ import annotations

import base64
import io

import pytest
import torch

import sgl_ray
import sgl_ray.lang as sgl
from sgl_ray.errors import InvalidRequestError, UnsupportedFeatureError
from sgl_ray.lang.images import ImageRef, chat_messages
from sgl_ray.multimodal import InvalidImageError

from ..vision.test_qwen2_vl import MAX_NEW, hf_greedy, reference  # noqa: F401  (transformers on it)
from ..vision.tiny_vl import IMAGE, draw

QUESTION = "What is in the picture?"
CHOICES = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def backend(qwen2_vl_path):  # noqa: F811
    with sgl_ray.Engine(qwen2_vl_path, max_total_tokens=4096, page_size=1) as engine:
        yield sgl.EngineBackend(engine)


@sgl.function
def describe(s, picture):
    s += sgl.user(sgl.image(picture) + QUESTION)
    s += sgl.assistant(sgl.gen("first", max_tokens=MAX_NEW, ignore_eos=True))
    s += sgl.user("And the colors?")
    s += sgl.assistant(sgl.gen("second", max_tokens=MAX_NEW, ignore_eos=True))


def pick_program(branches: list):
    """A program that forks after an image (its fork groups appended to ``branches``) and then selects."""

    @sgl.function
    def pick(s, picture):
        s += sgl.user(sgl.image(picture) + "Which shape is it?")
        s += sgl.assistant_begin()
        forks = s.fork(2)
        branches.append(forks)
        forks += sgl.gen("idea", max_tokens=4, ignore_eos=True)
        forks.join()
        s += sgl.select("shape", CHOICES)
        s += sgl.assistant_end()

    return pick


def chat_text(tokenizer, turns: list[tuple[str, str]]) -> str:
    messages = [{"role": role, "content": content} for role, content in turns]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def check_describe(state, reference, image) -> None:  # noqa: F811
    """Both gens equal transformers' greedy tokens on the chat text with the placeholder, the image sent each time."""
    tok = reference[2]
    turn1 = chat_text(tok, [("user", IMAGE + QUESTION)])
    first = hf_greedy(reference, turn1, [image])
    assert state["first"] == tok.decode(first, skip_special_tokens=True)
    turn2 = chat_text(
        tok, [("user", IMAGE + QUESTION), ("assistant", state["first"]), ("user", "And the colors?")]
    )
    assert state.text().startswith(turn2)
    assert state["second"] == tok.decode(hf_greedy(reference, turn2, [image]), skip_special_tokens=True)


def hf_choice_logprobs(reference, context: str, choices: list[str], images: list) -> list[list[float]]:  # noqa: F811
    """transformers' logprobs of each choice's own tokens after ``context`` (its image placeholders expanded as
    Qwen2VLProcessor does), the tokens counted as ``TokenScoringBackend`` counts them."""
    model, image_processor, tokenizer = reference
    pad = model.config.image_token_id
    inputs = image_processor(images=images, return_tensors="pt")
    ctx = tokenizer.encode(context)
    out = []
    for choice in choices:
        full = tokenizer.encode(context + choice)
        start = next(
            (i for i, (a, b) in enumerate(zip(ctx, full, strict=False)) if a != b), min(len(ctx), len(full))
        )
        own = len(full) - min(max(start, 1), len(full) - 1)
        grids = iter(inputs["image_grid_thw"])
        expanded = [x for t in full for x in ([pad] * int(next(grids).prod() // 4) if t == pad else [t])]
        ids = torch.tensor([expanded])
        with torch.no_grad():
            logits = model(input_ids=ids, **inputs, mm_token_type_ids=(ids == pad).int()).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        out.append([logp[i - 1, expanded[i]].item() for i in range(len(expanded) - own, len(expanded))])
    return out


def check_pick(state, forks, reference, image) -> None:  # noqa: F811
    """The forks' gens equal transformers' (their prefix, image included, came from the prefix cache); the
    select's scores equal transformers' mean logprobs with the image."""
    meta = forks[0].get_meta_info("idea")
    assert (
        meta["cached_tokens"] >= meta["prompt_tokens"] - 1
    )  # through the image: it was sent with the prefix
    tok = reference[2]
    context = chat_text(tok, [("user", IMAGE + "Which shape is it?")])
    want = tok.decode(hf_greedy(reference, context, [image])[:4], skip_special_tokens=True)
    assert state["idea"] == [want, want]
    scores = [sum(lp) / len(lp) for lp in hf_choice_logprobs(reference, context, CHOICES, [image])]
    got = state.get_meta_info("shape")["scores"]
    assert [got[c] for c in CHOICES] == pytest.approx(scores, abs=1e-4)
    assert state["shape"] == CHOICES[scores.index(max(scores))]


# --- in process -----------------------------------------------------------------------------------------------------


def test_image_turns_on_the_engine_match_transformers(backend, reference, tmp_path) -> None:  # noqa: F811
    """A PIL image, its PNG bytes, a path and a data: URL give the same program (run_batch), equal to
    transformers; the image is kept for the second gen; ``messages()`` has it as an ``image_url`` part."""
    image = draw(1)
    data = png(image)
    (tmp_path / "picture.png").write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    sources = [image, data, tmp_path / "picture.png", url]
    states = describe.run_batch([{"picture": x} for x in sources], backend=backend, temperature=0)
    check_describe(states[0], reference, image)
    assert {(s["first"], s["second"]) for s in states} == {(states[0]["first"], states[0]["second"])}
    # the reference depends on the image
    turn1 = chat_text(reference[2], [("user", IMAGE + QUESTION)])
    assert hf_greedy(reference, turn1, [draw(8)]) != hf_greedy(reference, turn1, [image])
    messages = states[0].messages()
    assert messages[0]["content"] == [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": QUESTION},
    ]
    assert messages[1] == {"role": "assistant", "content": states[0]["first"]}


def test_forks_share_the_image_and_select_scores_it(backend, reference) -> None:  # noqa: F811
    image, branches = draw(2), []
    state = pick_program(branches).run(image, backend=backend, temperature=0)
    check_pick(state, branches[0], reference, image)


def test_images_in_a_plain_prompt(backend, reference) -> None:  # noqa: F811
    """Two images outside any turn (a completion-style prompt): each placeholder where it was appended, both
    images sent; they are in no chat turn, so ``messages()`` is empty."""

    @sgl.function
    def compare(s, left, right):
        s += "Compare " + sgl.image(left) + " and " + sgl.image(right) + ":"
        s += sgl.gen("diff", max_tokens=MAX_NEW, ignore_eos=True)

    left, right = draw(4), draw(5, (56, 84))
    state = compare.run(left, right, backend=backend, temperature=0)
    tok = reference[2]
    want = hf_greedy(reference, f"Compare {IMAGE} and {IMAGE}:", [left, right])
    assert state["diff"] == tok.decode(want, skip_special_tokens=True)
    assert state.text() == f"Compare {IMAGE} and {IMAGE}:" + state["diff"] and state.messages() == []


def test_image_errors_are_typed(backend, tiny_qwen2_path, tmp_path) -> None:
    with pytest.raises(InvalidImageError, match="not int") as err:
        sgl.image(42)
    assert err.value.param == "image"
    with pytest.raises(InvalidImageError, match="cannot read"):
        describe.run(tmp_path / "missing.png", backend=backend)
    with pytest.raises(InvalidImageError, match="cannot decode the image"):
        describe.run(b"not an image", backend=backend)
    # a text model: refused when the image is appended, before any request
    with sgl_ray.Engine(tiny_qwen2_path, max_total_tokens=1024) as text_engine:
        with pytest.raises(InvalidImageError, match="this model takes no image inputs"):
            describe.run(draw(1), backend=sgl.EngineBackend(text_engine))
    completions = sgl.OpenAI("m", base_url="http://127.0.0.1:9/v1", is_chat_model=False)
    with pytest.raises(UnsupportedFeatureError, match="needs a chat model"):
        describe.run(draw(1), backend=completions)


def test_chat_messages_place_each_image_in_its_turn() -> None:
    """Unit: images become ``image_url`` parts where their placeholder stood; one outside a finished turn is an
    error for chat requests (and left out of ``messages()``); bytes that are no image fail when encoded."""
    a, b = ImageRef("http://h/a.png", 0), ImageRef("data:image/png;base64,AAAA", 0)
    out = chat_messages([{"role": "user", "content": "<i>x<i>"}], [a, b], "<i>")
    assert out[0]["content"] == [
        {"type": "image_url", "image_url": {"url": "http://h/a.png"}},
        {"type": "text", "text": "x"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]
    loose = ImageRef("http://h/c.png", None)
    with pytest.raises(InvalidRequestError, match="outside a finished turn"):
        chat_messages([{"role": "user", "content": "hi"}], [loose], "<i>")
    assert (
        chat_messages([{"role": "user", "content": "hi"}], [loose], "<i>", strict=False)[0]["content"] == "hi"
    )
    assert ImageRef(png(draw(1)), 0).url.startswith("data:image/png;base64,")
    with pytest.raises(InvalidImageError, match="cannot decode"):
        _ = ImageRef(b"nope", 0).url
