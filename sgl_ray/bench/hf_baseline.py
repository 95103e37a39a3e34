"""The Hugging Face transformers side of the offline benchmark: ``model.generate`` on the same weights.

Greedy, every request runs to exactly ``output_len`` new tokens (``min_new_tokens == max_new_tokens``), prompts
are run in static batches, left-padded with an attention mask, one batch after another.

Example::

    >>> from sgl_ray.bench.hf_baseline import HFBaseline
    >>> from sgl_ray.model_loader import default_model_path
    >>> hf = HFBaseline.load(str(default_model_path()))  # fp32 on CPU
    >>> hf.warm_up()
    >>> result = hf.run("transformers", [[1, 2, 3, 4]] * 2, output_len=8, batch_size=2)
    >>> result.output_tokens
    16
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from sgl_ray.bench.report import SystemResult
from sgl_ray.model_loader import resolve_model


class HFBaseline:
    """A transformers causal LM plus the ids it pads with, timed on lists of token-id prompts."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int, device: torch.device) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.device = device

    @classmethod
    def load(
        cls,
        model_path: str,
        revision: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> HFBaseline:
        """Load a local HF directory, a hub id or a ``.gguf`` file (dequantized by transformers, ``gguf_file=``)."""
        from transformers import AutoModelForCausalLM

        source = resolve_model(model_path, revision=revision)
        if source.format == "gguf":
            gguf = source.weight_files[0]
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source.local_dir, dtype=dtype)
        device = torch.device(device)
        model = model.to(device).eval()
        config = model.config
        pad = getattr(config, "pad_token_id", None)
        if pad is None:
            eos = getattr(config, "eos_token_id", None)
            pad = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0
        return cls(model, int(pad), device)

    def _generate(self, prompts: Sequence[Sequence[int]], output_len: int) -> int:
        """One static batch; returns the number of new tokens generated (all rows run to ``output_len``)."""
        from transformers import GenerationConfig

        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding: the last prompt token of every row is aligned
            input_ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention_mask[row, width - len(p) :] = 1
        config = GenerationConfig(
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.model.config.eos_token_id,
        )
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                generation_config=config,
            )  # [batch, width + output_len]
        return (out.shape[1] - width) * len(prompts)

    def warm_up(self) -> None:
        """One small untimed generation (first-call allocations, kernel selection)."""
        self._generate([[self.pad_token_id + 1] * 8], output_len=4)

    def run(
        self, name: str, prompts: Sequence[Sequence[int]], output_len: int, batch_size: int
    ) -> SystemResult:
        """Time ``prompts`` in static batches of ``batch_size`` (in order), each to ``output_len`` new tokens."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        out_tokens = 0
        start = time.perf_counter()
        for i in range(0, len(prompts), batch_size):
            out_tokens += self._generate(prompts[i : i + batch_size], output_len)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        return SystemResult(
            system=name,
            num_requests=len(prompts),
            input_tokens=sum(len(p) for p in prompts),
            output_tokens=out_tokens,
            wall_s=wall,
        )
