"""Batch generation with the in-process engine (no Ray).

Run: .venv/bin/python examples/offline_engine.py
"""

from __future__ import annotations

import sgl_ray


def main() -> None:
    prompts = [
        "The capital of France is",
        "Write a haiku about the sea:",
        "List three prime numbers:",
    ]
    with sgl_ray.Engine() as llm:  # the embedded SmolLM2-135M-Instruct model
        chats = [
            llm.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            for p in prompts
        ]
        for prompt, out in zip(
            prompts, llm.generate(chats, {"temperature": 0, "max_new_tokens": 48}), strict=True
        ):
            meta = out["meta_info"]
            print(
                f"> {prompt}\n{out['text'].strip()}\n  ({meta['completion_tokens']} tokens, {meta['finish_reason']})\n"
            )

        # Streaming, token by token.
        for chunk in llm.generate(
            chats[1], {"temperature": 0.7, "max_new_tokens": 48, "seed": 1}, stream=True
        ):
            print(chunk["text"], end="", flush=True)
        print()


if __name__ == "__main__":
    main()
