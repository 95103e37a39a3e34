"""A batch run: one program over many inputs with ``run_batch``. The requests run concurrently (continuous
batching on the server) and share the program's common prefix through the radix cache.

    python examples/lang_batch.py [--num 16] [--threads 8] [--sequential]

``--sequential`` first runs the same programs one after another and compares (the prefix cache is flushed
before each timing): greedy outputs are identical, the batch is faster.
"""

from __future__ import annotations

import time

from lang_common import make_backend, parser

import sgl_ray.lang as sgl

TOPICS = ["the sea", "mountains", "a city at night", "autumn", "the moon", "a library", "rain", "a garden"]


@sgl.function
def describe(s, topic: str, max_tokens: int):
    s += sgl.system("You are a poet. Answer with a single vivid sentence.")
    s += sgl.user(f"Describe {topic}.")
    s += sgl.assistant(sgl.gen("line", max_tokens=max_tokens, stop="\n"))


def main(argv: list[str] | None = None) -> list[sgl.ProgramState]:
    p = parser(__doc__)
    p.add_argument("--num", type=int, default=8)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--sequential", action="store_true", help="also time the programs run one by one")
    args = p.parse_args(argv)
    backend = make_backend(args)
    batch = [
        {"topic": f"{TOPICS[i % len(TOPICS)]} (#{i})", "max_tokens": args.max_tokens} for i in range(args.num)
    ]
    describe.run(topic="warm-up", max_tokens=2, backend=backend)  # first-call costs out of both timings
    alone = None
    if args.sequential:
        backend.flush_cache()
        start = time.perf_counter()
        alone = [describe.run(**kw, temperature=0, backend=backend) for kw in batch]
        seq_elapsed = time.perf_counter() - start
    backend.flush_cache()
    start = time.perf_counter()
    states = describe.run_batch(
        batch, num_threads=args.threads, progress_bar=True, temperature=0, backend=backend
    )
    elapsed = time.perf_counter() - start
    cached = sum(s.get_meta_info("line")["cached_tokens"] for s in states)
    prompt = sum(s.get_meta_info("line")["prompt_tokens"] for s in states)
    for kw, s in zip(batch, states, strict=True):
        print(f"{kw['topic']:>16}: {s['line'].strip()}")
    print(f"{len(states)} programs in {elapsed:.2f}s; {cached}/{prompt} prompt tokens from the prefix cache")
    if alone is not None:
        same = all(a["line"] == b["line"] for a, b in zip(alone, states, strict=True))
        print(
            f"one by one: {seq_elapsed:.2f}s ({seq_elapsed / elapsed:.2f}x slower); identical outputs: {same}"
        )
    return states


if __name__ == "__main__":
    main()
