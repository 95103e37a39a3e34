"""Session fixtures shared by the whole suite: the embedded default model and tiny random-weight HF models.

The tiny models share SmolLM2's tokenizer (vocab 49152), so text prompts work on all of them. Each is built once per
session; the default model is downloaded once per machine into the sgl_ray cache.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen2Config, Qwen3Config

from sgl_ray.model_loader import default_model_path, load_tokenizer, resolve_model

SMOLLM2_VOCAB_SIZE = 49152
_TINY_SHAPE = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    vocab_size=SMOLLM2_VOCAB_SIZE,
    max_position_embeddings=8192,
    bos_token_id=1,  # SmolLM2's <|im_start|>
    eos_token_id=2,  # SmolLM2's <|im_end|>
    pad_token_id=2,
    initializer_range=0.2,  # peaked logits, so greedy comparisons are not decided by rounding
)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The SmolLM2-135M-Instruct Q4_1 GGUF (downloaded and extracted on first use)."""
    return str(default_model_path())


def save_tiny_model(
    config: PretrainedConfig, directory: Path, smollm2_path: str | None, **save_kwargs
) -> str:
    """Random fp32 weights for ``config`` in ``directory``, with SmolLM2's tokenizer unless ``smollm2_path`` is
    None (the GPU machine cannot download the default model: its tests pass token ids)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory, **save_kwargs)  # transformers 5 always writes safetensors
    if smollm2_path is not None:
        load_tokenizer(resolve_model(smollm2_path)).save_pretrained(directory)
    return str(directory)


def tiny_llama_config() -> LlamaConfig:
    """Llama, 2 layers, untied embeddings, llama3 rope scaling."""
    return LlamaConfig(
        **_TINY_SHAPE,
        num_hidden_layers=2,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 2048,
        },
        rope_theta=500000.0,
    )


def save_config_only_llama(directory: Path) -> str:
    """A tiny Llama ``config.json`` and no weights or tokenizer (``load_format="dummy"``, token-id prompts)."""
    LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=1024,
    ).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory, smollm2_path: str) -> str:
    """:func:`tiny_llama_config` in one safetensors file."""
    return save_tiny_model(tiny_llama_config(), tmp_path_factory.mktemp("tiny_llama"), smollm2_path)


@pytest.fixture(scope="session")
def tiny_llama_3kv_path(tmp_path_factory: pytest.TempPathFactory, smollm2_path: str) -> str:
    """Llama with SmolLM2's head layout (6 query heads on 3 KV heads: tensor parallelism needs a divisor of 3), 4
    layers, tied embeddings."""
    shape = {
        **_TINY_SHAPE,
        "hidden_size": 96,
        "intermediate_size": 192,
        "num_attention_heads": 6,
        "num_key_value_heads": 3,
    }
    config = LlamaConfig(**shape, num_hidden_layers=4, tie_word_embeddings=True)
    return save_tiny_model(config, tmp_path_factory.mktemp("tiny_llama_3kv"), smollm2_path)


@pytest.fixture(scope="session")
def tiny_qwen2_path(tmp_path_factory: pytest.TempPathFactory, smollm2_path: str) -> str:
    """Qwen2 (QKV biases), 3 layers, untied embeddings, sharded safetensors with an index."""
    config = Qwen2Config(**_TINY_SHAPE, num_hidden_layers=3, tie_word_embeddings=False)
    return save_tiny_model(config, tmp_path_factory.mktemp("tiny_qwen2"), smollm2_path, max_shard_size="4MB")


@pytest.fixture(scope="session")
def tiny_qwen3_path(tmp_path_factory: pytest.TempPathFactory, smollm2_path: str) -> str:
    """Qwen3 (q/k norms), 2 layers, tied embeddings, one safetensors file."""
    config = Qwen3Config(**_TINY_SHAPE, num_hidden_layers=2, tie_word_embeddings=True)
    return save_tiny_model(config, tmp_path_factory.mktemp("tiny_qwen3"), smollm2_path)


# --- transformers references ------------------------------------------------------------------------------------


def greedy_continuation(model: torch.nn.Module, input_ids: list[int], max_new_tokens: int) -> list[int]:
    """``model.generate`` greedy (fp32, one prompt, no padding), run to ``max_new_tokens``."""
    ids = torch.tensor([input_ids])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(input_ids) :].tolist()


class PrefixMemo:
    """Greedy continuations memoized by prompt. The first n greedy tokens do not depend on how many follow, so the
    longest continuation computed for a prompt answers every shorter request; at least ``floor`` tokens are
    generated, so tests asking for 8, 10 or 12 tokens of the same prompt share one generation."""

    def __init__(self, floor: int = 12) -> None:
        self.floor = floor
        self._cache: dict[tuple, list[int]] = {}

    def get(self, key: tuple, max_new_tokens: int, generate) -> list[int]:
        have = self._cache.get(key)
        if have is None or len(have) < max_new_tokens:
            have = self._cache[key] = generate(max(max_new_tokens, self.floor))
        return have[:max_new_tokens]


class GreedyReference:
    """Greedy continuations from a transformers model (fp32, one prompt at a time), memoized per session."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._memo = PrefixMemo()

    def __call__(self, input_ids: list[int], max_new_tokens: int) -> list[int]:
        return self._memo.get(
            tuple(input_ids), max_new_tokens, lambda n: greedy_continuation(self.model, input_ids, n)
        )


def _hf_model(path: str) -> torch.nn.Module:
    p = Path(path)
    if p.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # references run to max_new_tokens (engine uses ignore_eos)
    return model.eval()


@pytest.fixture(scope="session")
def hf_reference(smollm2_path, tiny_llama_path, tiny_qwen2_path, tiny_qwen3_path, request):
    """``hf_reference(name)`` → a :class:`GreedyReference` for "smollm2", "llama", "llama_3kv", "qwen2" or
    "qwen3"."""
    paths = {
        "smollm2": smollm2_path,
        "llama": tiny_llama_path,
        "llama_3kv": lambda: request.getfixturevalue("tiny_llama_3kv_path"),
        "qwen2": tiny_qwen2_path,
        "qwen3": tiny_qwen3_path,
    }
    loaded: dict[str, GreedyReference] = {}

    def get(name: str) -> GreedyReference:
        if name not in loaded:
            path = paths[name]
            loaded[name] = GreedyReference(_hf_model(path() if callable(path) else path))
        return loaded[name]

    return get


# --- tiny MoE models (tests/moe_models.py) -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def moe_model(tmp_path_factory, smollm2_path):
    """``moe_model(name)`` -> the directory of that family's tiny random-weight model (built on first use)."""
    from .moe_models import moe_config

    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            built[name] = save_tiny_model(moe_config(name), tmp_path_factory.mktemp(name), smollm2_path)
        return built[name]

    return get


@pytest.fixture(scope="session")
def moe_reference(moe_model):
    """``moe_reference(name)`` -> a :class:`GreedyReference` of transformers on that tiny MoE model."""
    loaded: dict[str, GreedyReference] = {}

    def get(name: str) -> GreedyReference:
        if name not in loaded:
            loaded[name] = GreedyReference(_hf_model(moe_model(name)))
        return loaded[name]

    return get


# --- LoRA adapters (tests/lora/adapters.py) ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def lora_adapters(tiny_llama_path, tmp_path_factory) -> dict[str, str]:
    """``{name: PEFT adapter directory}`` on the tiny Llama, random weights (see ``tests/lora/adapters.py``)."""
    pytest.importorskip("peft")
    from .lora.adapters import ADAPTERS, make_adapter

    root = tmp_path_factory.mktemp("lora")
    return {
        name: make_adapter(tiny_llama_path, root / name, *spec, seed=i)
        for i, (name, spec) in enumerate(ADAPTERS.items())
    }


@pytest.fixture(scope="session")
def peft_reference(tiny_llama_path, lora_adapters):
    """``peft_reference(adapter or None, input_ids, new)`` → greedy tokens of transformers + peft."""
    from .lora.adapters import PeftReference

    return PeftReference(tiny_llama_path, lora_adapters)


# --- one Ray cluster for the whole session ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_cluster():
    """A local cluster with 8 logical CPUs (shard actors and replicas take one each; the machine may have fewer
    cores), started on first use and shared by the Ray and Serve tiers."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


# --- one Serve app for the whole session (the Serve tests and the frontend-language tests share it) ---------------

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_url(ray_cluster, smollm2_path):
    """A real Ray Serve app on 127.0.0.1 (SmolLM2, one replica, API key on)."""
    from ray import serve

    from sgl_ray.deployments import build_openai_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_openai_app(
        {
            "model_path": smollm2_path,
            "max_total_tokens": 16384,
            "api_key": API_KEY,
            "served_model_name": "smollm2",
            "max_body_bytes": 2**20,
        }
    )
    serve.run(app, name="main", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="session")
def client(serve_url):
    import openai

    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="session")
def aclient(serve_url):
    import openai

    return openai.AsyncOpenAI(base_url=f"{serve_url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="session")
def qwen2_vl_path(tmp_path_factory: pytest.TempPathFactory, smollm2_path: str) -> str:
    """The tiny random-weight Qwen2-VL of ``tests/vision/tiny_vl.py`` (vision and frontend-language tests)."""
    from .vision.tiny_vl import save_tiny_vl

    return save_tiny_vl(tmp_path_factory.mktemp("qwen2_vl"), smollm2_path, "qwen2_vl")
