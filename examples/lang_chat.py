"""Multi-turn chat: each answer is generated in the context of the turns before it.

sgl-ray serve &            # then:
python examples/lang_chat.py [--backend engine]
"""

from __future__ import annotations

from lang_common import make_backend, parser

import sgl_ray.lang as sgl


@sgl.function
def multi_turn(s, questions: list[str], max_tokens: int):
    s += sgl.system("You are a helpful assistant. Answer in one short sentence.")
    for i, q in enumerate(questions):
        s += sgl.user(q)
        s += sgl.assistant(sgl.gen(f"answer_{i}", max_tokens=max_tokens, stop="\n"))


def main(argv: list[str] | None = None) -> sgl.ProgramState:
    args = parser(__doc__).parse_args(argv)
    questions = ["What is the capital of France?", "And what is its most famous tower?"]
    state = multi_turn.run(questions, args.max_tokens, temperature=0, backend=make_backend(args))
    for m in state.messages():
        print(f"{m['role']:>9}: {m['content']}")
    return state


if __name__ == "__main__":
    main()
