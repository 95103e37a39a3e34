"""Tree of thought with ``fork``: several branches continue one prompt in parallel (sharing its KV through the
prefix cache), then the model picks the best branch with ``select``.

    python examples/lang_tree_of_thought.py [--branches 3]
"""

from __future__ import annotations

from lang_common import make_backend, parser

import sgl_ray.lang as sgl


@sgl.function
def tree_of_thought(s, question: str, branches: int, max_tokens: int):
    s += sgl.user(question)
    s += sgl.assistant_begin()
    s += "Let me think of a few approaches.\n"
    forks = s.fork(branches)
    for i, f in enumerate(forks):
        f += f"Approach {i + 1}:" + sgl.gen(
            "thought", max_tokens=max_tokens, stop="\n", temperature=0.8, seed=i
        )
    forks.join()  # s["thought"] is now the list of every branch's thought
    for i, thought in enumerate(s["thought"]):
        s += f"Approach {i + 1}:{thought}\n"
    s += "The best approach is number " + sgl.select("best", [str(i + 1) for i in range(branches)])
    s += sgl.assistant_end()


def main(argv: list[str] | None = None) -> sgl.ProgramState:
    p = parser(__doc__)
    p.add_argument("--branches", type=int, default=3)
    args = p.parse_args(argv)
    question = "How could a small town reduce its traffic jams?"
    state = tree_of_thought.run(question, args.branches, args.max_tokens, backend=make_backend(args))
    for i, t in enumerate(state["thought"]):
        print(f"branch {i + 1}: {t.strip()}")
    print("best:", state["best"])
    return state


if __name__ == "__main__":
    main()
