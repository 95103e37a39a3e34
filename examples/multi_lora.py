"""Multi-LoRA with the in-process engine on the default SmolLM2: two adapters and the base model in one batch,
an adapter hot-loaded and unloaded at run time.

The adapters here are random (written in PEFT format by ``sgl_ray.bench.lora.write_random_adapter``), so their
answers are not meant to be better, only different; point ``lora_paths`` at real PEFT adapter directories instead.

Run: .venv/bin/python examples/multi_lora.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import sgl_ray
from sgl_ray.bench.lora import write_random_adapter
from sgl_ray.model_loader import default_model_path, load_hf_config, resolve_model


def main() -> None:
    hf_config = load_hf_config(resolve_model(str(default_model_path())))
    with tempfile.TemporaryDirectory() as tmp:
        a, b = (
            write_random_adapter(Path(tmp) / n, hf_config, rank=8, seed=i, b_std=0.1)
            for i, n in enumerate("ab")
        )
        with sgl_ray.Engine(lora_paths=[f"alpha={a}"], max_loras_per_batch=4) as llm:
            llm.load_lora_adapter("beta", b)
            prompts = ["The capital of France is"] * 3
            outs = llm.generate(
                prompts, {"temperature": 0, "max_new_tokens": 12}, lora_path=["alpha", "beta", None]
            )
            for name, out in zip(["alpha", "beta", "base"], outs, strict=True):
                print(f"{name:>5}: {out['text']!r}")
            print(llm.list_lora_adapters())
            llm.unload_lora_adapter("beta")
            print(sorted(llm.list_lora_adapters()))


if __name__ == "__main__":
    main()
