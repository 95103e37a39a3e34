"""The Ray Data processor in Ray Data LLM's shape: Ray's config names, ``ray.data.llm.build_processor`` as a second
entry point, a failing row that names itself (an error column with ``should_continue_on_error``, else a failed job),
engine progress logged from the actors, and rows with images on a vision-language model (Ray Data LLM's image
parts, OpenAI's ``image_url`` parts, an ``image`` column) equal to transformers."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import numpy as np
import pytest

from sgl_ray.deployments.data import (
    ERROR_COLUMN,
    Processor,
    ProcessorConfig,
    Progress,
    RowError,
    build_processor,
)
from sgl_ray.errors import InvalidRequestError

from ..vision.test_qwen2_vl import MAX_NEW, hf_greedy, reference  # noqa: F401  (transformers on it)
from ..vision.tiny_vl import IMAGE, draw

pytestmark = [pytest.mark.ray]

ray_data = pytest.importorskip("ray.data")

GREEDY = {"temperature": 0.0, "max_new_tokens": 3, "ignore_eos": True}
QUESTIONS = ("Say yes.", "Say no.", "Name a color.", "Count to three.", "Say maybe.", "Name a fruit.")
PARAMS = {
    1: {"temperature": 0.0, "max_tokens": 3, "ignore_eos": True},  # vLLM's and OpenAI's name: an alias
    2: {**GREEDY, "temperature": -1.0},  # a bad value
    5: {**GREEDY, "detokenize": False},  # a key the engine does not know (vLLM's): an error, not ignored
}
BAD = (2, 4, 5, 10)  # and row 4 has no prompt at all, row 10 an image that is none
IMAGE_ROWS = (6, 7, 8, 9)
LOOK = "What is this?"


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _image_items() -> list[dict]:
    """Image rows: Ray Data LLM's ``image`` part (a PIL image) and OpenAI's ``image_url`` part (a data: URL) of the
    same picture; a prompt with the image column as PNG bytes and as an array; an undecodable image."""
    picture, other = draw(1), draw(2)
    url = "data:image/png;base64," + base64.b64encode(_png(picture)).decode()
    text = {"type": "text", "text": LOOK}
    return [
        {"id": 6, "messages": [{"role": "user", "content": [{"type": "image", "image": picture}, text]}]},
        {
            "id": 7,
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, text]}
            ],
        },
        {"id": 8, "prompt": f"{IMAGE}Describe it.", "image": _png(other)},
        {"id": 9, "prompt": f"{IMAGE}Describe it.", "image": np.asarray(other)},
        {
            "id": 10,
            "messages": [{"role": "user", "content": [{"type": "image", "image": b"not an image"}, text]}],
        },
    ]


def _chat_row(row: dict) -> dict:
    if row["id"] >= 6:  # an image row: as given, more tokens
        given = {k: v for k, v in row.items() if v is not None and k != "q"}
        return {**given, "sampling_params": {**GREEDY, "max_new_tokens": MAX_NEW}}
    params = PARAMS.get(row["id"], GREEDY)
    if row["id"] == 4:
        return {"id": row["id"], "sampling_params": params}
    return {"id": row["id"], "messages": [{"role": "user", "content": row["q"]}], "sampling_params": params}


def _answer(row: dict) -> dict:
    return {"id": row["id"], "answer": row["generated_text"], "tokens": list(row["generated_tokens"])}


def _items() -> list[dict]:
    return [{"id": i, "q": q} for i, q in enumerate(QUESTIONS)]


# --- the config (no cluster) ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [0, -1, (0, 2), (3, 1), (1, 2, 3), "2", 1.5, True])
def test_concurrency_must_be_a_count_or_a_min_max_pair(concurrency):
    with pytest.raises(InvalidRequestError, match="concurrency"):
        ProcessorConfig(concurrency=concurrency)


def test_config_takes_ray_names_and_refuses_contradictions():
    config = ProcessorConfig(model_source="m", concurrency=(1, 3), chat_template_stage={"enabled": False})
    assert config.pool_size() == {"min_size": 1, "max_size": 3}
    assert ProcessorConfig(concurrency=[2, 2]).pool_size() == {"min_size": 2, "max_size": 2}  # a YAML list
    assert ProcessorConfig(concurrency=2).pool_size() == {"size": 2}
    assert config.engine_kwargs_with_model == {"model_path": "m"}
    assert config.chat_template == (False, None)
    assert ProcessorConfig().chat_template == (True, None)  # on by default, as in Ray
    stage = ProcessorConfig(chat_template_stage={"chat_template_kwargs": {"enable_thinking": False}})
    assert stage.chat_template == (True, {"enable_thinking": False})
    with pytest.raises(InvalidRequestError, match="model_source"):
        ProcessorConfig(model_source="a", engine_kwargs={"model_path": "b"})
    with pytest.raises(InvalidRequestError, match=r"chat_template_stage: .*\['batch_size'\]"):
        ProcessorConfig(chat_template_stage={"enabled": True, "batch_size": 64})
    with pytest.raises(InvalidRequestError, match="batch_size"):
        ProcessorConfig(batch_size=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'tokenize_stage'"):
        ProcessorConfig(tokenize_stage=False)
    assert not ProcessorConfig().images and ProcessorConfig(has_image=True).images
    assert ProcessorConfig(prepare_multimodal_stage={"enabled": True}).images
    assert not ProcessorConfig(prepare_multimodal_stage={"enabled": False}).images
    with pytest.raises(InvalidRequestError, match=r"prepare_multimodal_stage: .*\['model_config_kwargs'\]"):
        ProcessorConfig(prepare_multimodal_stage={"enabled": True, "model_config_kwargs": {}})


def test_build_processor_refuses_foreign_configs_and_unknown_builder_kwargs():
    from ray.data.llm import HttpRequestProcessorConfig

    with pytest.raises(TypeError, match="HttpRequestProcessorConfig"):
        build_processor(HttpRequestProcessorConfig(url="http://127.0.0.1:1"))
    with pytest.raises(TypeError, match=r"unknown builder_kwargs \['tokenizer'\]"):
        build_processor(ProcessorConfig(), builder_kwargs={"tokenizer": None})


def test_progress_line_counts_rows_tokens_and_failures():
    p = Progress(started=10.0)
    for _ in range(4):
        p.add_row(prompt=50, cached=25, generated=10)
    p.add_row(prompt=0, cached=0, generated=0, failed=True)
    line = p.line(now=12.0, in_flight=7)
    assert line.startswith("5 rows done (1 failed) in 2.0s: 2.5 rows/s, prompt 100 tok/s (50% cached)")
    assert line.endswith("generation 20 tok/s; 7 in flight")


def test_window_sort_groups_prefix_families_and_is_stable():
    """``order_by_prefix`` sorts a window of rows: rows whose prompts share a prefix end up next to each other,
    the other columns travel with their rows, and rows with the same prompt keep their input order."""
    import pyarrow as pa

    from sgl_ray.deployments.data_rows import sort_window

    families = ("Notes on rivers. ", "Notes on apples. ", "Notes on comets. ")
    rows = [{"id": i, "prompt": families[i % 3] + f"Q{i // 3 % 2}", "extra": i * 10} for i in range(12)]
    out = sort_window(pa.Table.from_pylist(rows)).to_pylist()
    assert sorted(r["id"] for r in out) == list(range(12)) and all(r["extra"] == r["id"] * 10 for r in out)
    assert [r["prompt"] for r in out] == sorted(r["prompt"] for r in rows)
    for k in range(0, 12, 4):  # each family's 4 rows in a run: Q0, Q0, Q1, Q1, equal prompts in input order
        run = out[k : k + 4]
        assert len({r["prompt"][:16] for r in run}) == 1
        assert [r["id"] for r in run[:2]] == sorted(r["id"] for r in run[:2])
        assert [r["id"] for r in run[2:]] == sorted(r["id"] for r in run[2:])
    ids = [{"id": i, "input_ids": [5, 300 + i % 2, i]} for i in range(4)]
    assert [r["id"] for r in sort_window(pa.Table.from_pylist(ids)).to_pylist()] == [0, 2, 1, 3]


def test_row_images_are_split_from_messages_and_the_image_column():
    """Unit: image parts become the placeholder where they stand, with their images in order; the ``image``
    column goes with a prompt; arrays become PIL images and ``{"bytes", "path"}`` structs their bytes; rows that
    mix the two ways, unknown parts and image parts for a text model are errors naming the part."""
    from PIL import Image

    from sgl_ray.deployments.data_rows import split_images
    from sgl_ray.multimodal import InvalidImageError

    pixels = np.zeros((4, 6, 3), dtype=np.uint8)
    parts = [
        {"type": "text", "text": "A", "image": None},  # Arrow fills the keys other parts have with None
        {"type": "image_url", "image_url": {"url": "data:,x"}},
        {"type": "image", "image": {"bytes": b"png", "path": None}},
    ]
    row, images = split_images({"messages": [{"role": "user", "content": parts}]}, "<i>")
    assert row["messages"] == [{"role": "user", "content": "A\n<i>\n<i>"}] and images == ["data:,x", b"png"]
    row, images = split_images({"prompt": "<i>", "image": pixels}, "<i>")
    assert row["prompt"] == "<i>" and isinstance(images[0], Image.Image) and images[0].size == (6, 4)
    assert split_images({"prompt": "hi", "image": None}, None)[1] == []
    both = {"messages": [{"role": "user", "content": parts}], "image": [b"x"]}
    with pytest.raises(InvalidRequestError, match="not in the `image` column"):
        split_images(both, "<i>")
    audio = {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": "x"}]}]}
    with pytest.raises(
        InvalidRequestError, match=r"messages\[0\].content\[0\]: content part type 'input_audio'"
    ):
        split_images(audio, "<i>")
    with pytest.raises(
        InvalidImageError, match=r"messages\[0\].content\[1\]: this model takes no image inputs"
    ):
        split_images({"messages": [{"role": "user", "content": parts}]}, None)


def test_has_image_refuses_a_text_model_at_start_up(tiny_qwen2_path):
    from sgl_ray.deployments.data_stage import EngineStage
    from sgl_ray.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="takes no image inputs"):
        EngineStage(
            {"model_path": tiny_qwen2_path, "max_total_tokens": 1024},
            apply_chat_template=True,
            max_concurrent_batches=1,
            log_interval_s=0,
            require_images=True,
        )


# --- on a cluster ---------------------------------------------------------------------------------------------------


def test_ray_entry_point_error_column_and_progress_log(ray_cluster, qwen2_vl_path, reference):  # noqa: F811
    """``ray.data.llm.build_processor`` builds our processor from Ray's names (``has_image`` too); bad rows get
    ``__inference_error__`` naming them and skip postprocess (a bad image fails its row only), the good rows run
    through, image rows give transformers' greedy tokens, and each engine actor logs its progress. The model is
    the tiny Qwen2-VL, which serves the text rows as any model does."""
    import ray
    from ray.data.llm import build_processor as ray_build_processor

    config = ProcessorConfig(
        model_source=qwen2_vl_path,
        engine_kwargs={"max_total_tokens": 2048},
        concurrency=(1, 2),
        batch_size=2,
        should_continue_on_error=True,
        log_interval_s=0.2,
        has_image=True,
    )
    started = time.time()
    processor = ray_build_processor(config, _chat_row, _answer)
    assert isinstance(processor, Processor) and processor.config is config  # ours, built by Ray's entry point
    ds = ray_data.from_items(_items() + _image_items(), override_num_blocks=3)
    rows = {r["id"]: r for r in processor(ds).take_all()}
    assert sorted(rows) == list(range(len(QUESTIONS) + 5))
    for i in BAD:
        assert rows[i][ERROR_COLUMN].startswith(f"row {{'id': {i}}}"), rows[i][ERROR_COLUMN]
        assert rows[i].get("answer") is None and rows[i]["generated_text"] == ""
    assert "InvalidRequestError: temperature" in rows[2][ERROR_COLUMN]
    assert "needs `prompt`, `messages` or `input_ids`" in rows[4][ERROR_COLUMN]
    assert "unknown field `detokenize`" in rows[5][ERROR_COLUMN], rows[5][ERROR_COLUMN]
    assert "InvalidImageError: image_data[0]: cannot decode the image" in rows[10][ERROR_COLUMN]
    good = {i: r for i, r in rows.items() if i not in BAD}
    assert all(r[ERROR_COLUMN] == "" for r in good.values())
    assert all(len(r["tokens"]) == 3 for i, r in good.items() if i not in IMAGE_ROWS)
    # image parts render as the placeholder on a line of their own, as /v1/chat/completions renders them
    tok = reference[2]
    chat = tok.apply_chat_template(
        [{"role": "user", "content": f"{IMAGE}\n{LOOK}"}], add_generation_prompt=True, tokenize=False
    )
    want = hf_greedy(reference, chat, [draw(1)])
    assert rows[6]["tokens"] == want and rows[7]["tokens"] == want
    assert hf_greedy(reference, chat, [draw(2)]) != want  # the reference depends on the image
    want = hf_greedy(reference, f"{IMAGE}Describe it.", [draw(2)])
    assert rows[8]["tokens"] == want and rows[9]["tokens"] == want

    # Progress lines from the engine actors (the test cluster does not forward worker output to the driver: read
    # the workers' log files).
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    lines = [
        line
        for f in logs.glob("worker-*.err")
        if f.stat().st_mtime >= started
        for line in f.read_text(errors="replace").splitlines()
        if "sgl_ray.data: engine actor" in line
    ]
    assert any("rows done" in line and "tok/s" in line for line in lines), lines[-5:]


def test_a_failing_row_fails_its_batch_naming_the_row(tiny_qwen2_path):
    """Without ``should_continue_on_error`` a bad row fails its batch (and so the job) with a :class:`RowError`
    naming the row. Run on the engine stage itself, in this process: the class each engine actor holds."""
    import asyncio

    import pyarrow as pa

    from sgl_ray.deployments.data_stage import EngineStage

    stage = EngineStage(
        {"model_path": tiny_qwen2_path, "max_total_tokens": 2048},
        apply_chat_template=True,
        max_concurrent_batches=2,
        log_interval_s=0,
    )
    try:
        rows = [
            {"id": 10 + i, "prompt": q, "sampling_params": {**GREEDY, "top_p": 7.0} if i == 1 else GREEDY}
            for i, q in enumerate(QUESTIONS[:3])
        ]
        good = pa.Table.from_pylist([{**r, "sampling_params": GREEDY} for r in rows])

        async def run() -> pa.Table:
            with pytest.raises(
                RowError, match=r"^row \{'id': 11\} \(prompt 'Say no\.'\): InvalidRequestError: top_p"
            ):
                await stage(pa.Table.from_pylist(rows))
            return await stage(good)  # the engine goes on serving

        out = asyncio.run(run())
        assert out.column("id").to_pylist() == [10, 11, 12]
        assert out.column("num_generated_tokens").to_pylist() == [3, 3, 3]
        assert ERROR_COLUMN not in out.column_names  # only with should_continue_on_error
        assert stage.progress is not None and stage.progress.rows == 3 and stage.in_flight == 0
    finally:
        stage.engine.shutdown()
