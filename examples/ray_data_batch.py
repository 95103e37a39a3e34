"""Batch inference over a Ray Data dataset with a pool of sgl_ray engine actors.

Questions share a system prompt, so the processor's prefix ordering (on by default) lets each engine compute it once.

Run: .venv/bin/python examples/ray_data_batch.py
"""

from __future__ import annotations

import ray

from sgl_ray.deployments.data import ProcessorConfig, build_processor

SYSTEM = "You are a concise assistant. Answer in one short sentence."
QUESTIONS = [
    "What is the capital of France?",
    "Name a primary color.",
    "How many legs does a spider have?",
    "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?",
    "What is 7 times 8?",
    "Which planet is known as the red planet?",
    "What gas do plants absorb from the air?",
]


def preprocess(row: dict) -> dict:
    return {
        "id": row["id"],
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": row["question"]}],
        "sampling_params": {"temperature": 0.0, "max_new_tokens": 32},
    }


def postprocess(row: dict) -> dict:
    return {
        "id": row["id"],
        "question": row["messages"][-1]["content"],
        "answer": row["generated_text"].strip(),
        "tokens": f"{row['num_input_tokens']} in ({row['num_cached_tokens']} cached), "
        f"{row['num_generated_tokens']} out, {row['finish_reason']}",
    }


def main() -> None:
    ray.init(include_dashboard=False)
    config = ProcessorConfig(
        engine_kwargs={"max_total_tokens": 8192},  # model_path defaults to the embedded SmolLM2-135M-Instruct
        concurrency=1,
        batch_size=4,
        apply_chat_template=True,
    )
    processor = build_processor(config, preprocess=preprocess, postprocess=postprocess)
    ds = ray.data.from_items([{"id": i, "question": q} for i, q in enumerate(QUESTIONS)])
    for row in sorted(processor(ds).take_all(), key=lambda r: r["id"]):  # rows come back in prompt order
        print(f"> {row['question']}\n  {row['answer']}\n  [{row['tokens']}]")


if __name__ == "__main__":
    main()
