"""Request sets of ``sgl-ray bench serving`` (like ``sglang.bench_serving``'s ``random`` and
``generated-shared-prefix`` datasets), as text, so they work against any server.

- ``random``: ``num_prompts`` prompts of random token ids (special tokens excluded) decoded to text, with lengths
  uniform in ``[input_len * range_ratio, input_len]``.
- ``shared-prefix``: ``num_prefixes`` system prompts of ``prefix_len`` random tokens, each followed by a distinct
  question of about ``question_len`` tokens; the requests are spread evenly over the prefixes and shuffled, so a
  cache-aware router and a radix cache have something to find.

Every request asks for exactly ``output_len`` new tokens (the client sends ``ignore_eos``), so runs compare fairly.
Everything is drawn from ``seed``: the same config and tokenizer give the same requests.

Example::

    >>> from sgl_ray.bench.datasets import DatasetConfig, load_bench_tokenizer, make_requests
    >>> tokenizer = load_bench_tokenizer(None)  # the embedded SmolLM2's
    >>> reqs = make_requests(DatasetConfig("shared-prefix", num_prompts=4, prefix_len=64, num_prefixes=2), tokenizer)
    >>> len(reqs), len({r.system for r in reqs}), reqs[0].output_len
    (4, 2, 128)
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class DatasetConfig:
    """Which request set to build and its sizes (token counts are in the benchmark tokenizer's tokens)."""

    name: str = "random"
    num_prompts: int = 1000
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    prefix_len: int = 512
    num_prefixes: int = 8
    question_len: int = 32
    seed: int = 1

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"unknown dataset {self.name!r}; choose from {sorted(DATASETS)}")
        sizes = {"num_prompts": self.num_prompts, "input_len": self.input_len, "output_len": self.output_len}
        sizes.update(
            prefix_len=self.prefix_len, num_prefixes=self.num_prefixes, question_len=self.question_len
        )
        if bad := [k for k, v in sizes.items() if v < 1]:
            raise ValueError(f"{', '.join(bad)} must be >= 1")
        if not 0.0 <= self.range_ratio <= 1.0:
            raise ValueError("range_ratio must be in [0, 1]")

    def params(self) -> dict[str, Any]:
        """The parameters that matter for ``name`` (what a JSONL record shows)."""
        common = {"dataset": self.name, "num_prompts": self.num_prompts, "output_len": self.output_len}
        if self.name == "random":
            common.update(input_len=self.input_len, range_ratio=self.range_ratio)
        else:
            common.update(
                prefix_len=self.prefix_len, num_prefixes=self.num_prefixes, question_len=self.question_len
            )
        return {**common, "seed": self.seed}


@dataclass(frozen=True)
class BenchRequest:
    """One request: an optional system prompt (the shared prefix), the user ``prompt``, and its sizes.

    Chat backends send ``system`` as a system message; text backends send :attr:`text`. ``prompt_len`` counts
    the tokens of :attr:`text` without a chat template (the server's usage, when sent, is what gets reported).
    """

    prompt: str
    prompt_len: int
    output_len: int
    system: str | None = None

    @property
    def text(self) -> str:
        return self.prompt if self.system is None else self.system + self.prompt

    def messages(self) -> list[dict[str, str]]:
        user = [{"role": "user", "content": self.prompt}]
        return user if self.system is None else [{"role": "system", "content": self.system}, *user]


def load_bench_tokenizer(path: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer of ``path``: a directory with tokenizer files, a model directory, a ``.gguf`` file or a hub id;
    ``None`` is the embedded default model (SmolLM2)."""
    from transformers import AutoTokenizer

    from sgl_ray.model_loader import default_model_path, load_tokenizer, resolve_model

    path = path or str(default_model_path())
    local = Path(path).expanduser()
    if local.is_dir() and (local / "tokenizer_config.json").is_file():  # tokenizer files only is enough
        return AutoTokenizer.from_pretrained(local, use_fast=True)
    return load_tokenizer(resolve_model(path))


def _token_pool(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    special = set(tokenizer.all_special_ids)
    return [i for i in range(len(tokenizer)) if i not in special]


def _random_text(
    tokenizer: PreTrainedTokenizerBase, pool: list[int], n: int, rng: random.Random
) -> tuple[str, int]:
    """Text of about ``n`` random tokens and its token count. Decoding random ids and encoding the text back merges
    some of them, so the ids are topped up a few times and cut to ``n``."""
    ids: list[int] = []
    for _ in range(4):
        ids = tokenizer.encode(
            tokenizer.decode(ids + rng.choices(pool, k=n - len(ids))), add_special_tokens=False
        )
        ids = ids[:n]
        if len(ids) == n:
            break
    text = tokenizer.decode(ids)
    return text, len(tokenizer.encode(text, add_special_tokens=False))


def random_requests(cfg: DatasetConfig, tokenizer: PreTrainedTokenizerBase) -> list[BenchRequest]:
    rng = random.Random(f"{cfg.seed}-random")
    pool = _token_pool(tokenizer)
    low = max(1, int(cfg.input_len * cfg.range_ratio))
    out = []
    for _ in range(cfg.num_prompts):
        text, n = _random_text(tokenizer, pool, rng.randint(low, cfg.input_len), rng)
        out.append(BenchRequest(text, n, cfg.output_len))
    return out


def shared_prefix_requests(cfg: DatasetConfig, tokenizer: PreTrainedTokenizerBase) -> list[BenchRequest]:
    rng = random.Random(f"{cfg.seed}-shared-prefix")
    pool = _token_pool(tokenizer)
    prefixes = [_random_text(tokenizer, pool, cfg.prefix_len, rng) for _ in range(cfg.num_prefixes)]
    out = []
    for i in range(cfg.num_prompts):
        system = prefixes[i % cfg.num_prefixes][0]
        prompt = f"\n\nQuestion {i}: {_random_text(tokenizer, pool, cfg.question_len, rng)[0]}"
        n = len(tokenizer.encode(system + prompt, add_special_tokens=False))
        out.append(BenchRequest(prompt, n, cfg.output_len, system=system))
    rng.shuffle(out)
    return out


DATASETS: dict[str, Callable[[DatasetConfig, PreTrainedTokenizerBase], list[BenchRequest]]] = {
    "random": random_requests,
    "shared-prefix": shared_prefix_requests,
}
"""Dataset name → builder of its requests."""


def make_requests(cfg: DatasetConfig, tokenizer: PreTrainedTokenizerBase) -> list[BenchRequest]:
    """The requests of ``cfg`` (deterministic in ``cfg.seed``)."""
    return DATASETS[cfg.name](cfg, tokenizer)
