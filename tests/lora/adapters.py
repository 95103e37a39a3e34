"""Random-weight PEFT LoRA adapters on the tiny Llama, made with ``peft`` in the test session, and greedy
references from transformers + peft on the same adapter (fixtures ``lora_adapters`` and ``peft_reference`` in
``tests/conftest.py``)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..conftest import PrefixMemo

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name: (rank, alpha, target modules, rsLoRA)
ADAPTERS = {
    "a0": (8, 16, ALL, False),
    "a1": (4, 8, ["q_proj", "v_proj"], True),
    "a2": (16, 8, ["o_proj", "gate_proj", "down_proj"], False),
    "a3": (2, 4, ALL, True),
}


def _peft():
    import peft

    return peft


def _base(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    return model.eval()


def make_adapter(
    base_path: str, directory: Path, rank: int, alpha: int, targets, rslora: bool, seed: int
) -> str:
    """A PEFT adapter whose A and B are random (PEFT starts B at zero, which would change nothing)."""
    peft = _peft()
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, lora_dropout=0.0
    )
    model = peft.get_peft_model(_base(base_path), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(directory)
    return str(directory)


class PeftReference:
    """Greedy continuations of transformers + peft per adapter (None: the base model), memoized."""

    def __init__(self, base_path: str, adapters: dict[str, str]) -> None:
        self.base_path, self.adapters = base_path, adapters
        self._models: dict[str | None, torch.nn.Module] = {}
        self._memo = PrefixMemo(floor=8)

    def model(self, name: str | None) -> torch.nn.Module:
        if name not in self._models:
            base = _base(self.base_path)
            self._models[name] = (
                base if name is None else _peft().PeftModel.from_pretrained(base, self.adapters[name]).eval()
            )
        return self._models[name]

    def __call__(self, name: str | None, input_ids: list[int], new: int) -> list[int]:
        from ..conftest import greedy_continuation

        return self._memo.get(
            (name, tuple(input_ids)), new, lambda n: greedy_continuation(self.model(name), input_ids, n)
        )
