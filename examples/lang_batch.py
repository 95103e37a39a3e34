"""A batch run: one program over many inputs with ``run_batch``. The requests run concurrently (continuous
batching on the server) and share the program's common prefix through the radix cache.

    python examples/lang_batch.py [--num 16] [--threads 8]
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
    args = p.parse_args(argv)
    batch = [{"topic": TOPICS[i % len(TOPICS)], "max_tokens": args.max_tokens} for i in range(args.num)]
    start = time.perf_counter()
    states = describe.run_batch(
        batch, num_threads=args.threads, progress_bar=True, temperature=0, backend=make_backend(args)
    )
    elapsed = time.perf_counter() - start
    cached = sum(s.get_meta_info("line")["cached_tokens"] for s in states)
    prompt = sum(s.get_meta_info("line")["prompt_tokens"] for s in states)
    for kw, s in zip(batch, states, strict=True):
        print(f"{kw['topic']:>16}: {s['line'].strip()}")
    print(f"{len(states)} programs in {elapsed:.2f}s; {cached}/{prompt} prompt tokens from the prefix cache")
    return states


if __name__ == "__main__":
    main()
