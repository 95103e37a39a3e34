"""Few-shot classification with ``select``: the label is the choice the model scores highest (token-length
normalized logprob), never free text.

    python examples/lang_classify.py [--backend engine]
"""

from __future__ import annotations

from lang_common import make_backend, parser

import sgl_ray.lang as sgl

LABELS = ["positive", "negative"]
SHOTS = [
    ("I loved this movie, the acting was wonderful.", "positive"),
    ("Terrible food and rude staff. Never again.", "negative"),
    ("What a fantastic day at the beach!", "positive"),
    ("The product broke after one day, total waste of money.", "negative"),
]
REVIEWS = [
    "An absolute delight from start to finish.",
    "Boring, slow and far too long.",
    "The service was awful and the room was dirty.",
]


@sgl.function
def classify(s, review: str):
    s += "Classify the sentiment of each review as positive or negative.\n\n"
    for text, label in SHOTS:
        s += f"Review: {text}\nSentiment: {label}\n\n"
    s += f"Review: {review}\nSentiment: " + sgl.select("label", choices=LABELS)


def main(argv: list[str] | None = None) -> list[sgl.ProgramState]:
    args = parser(__doc__).parse_args(argv)
    states = classify.run_batch([{"review": r} for r in REVIEWS], backend=make_backend(args))
    for review, s in zip(REVIEWS, states, strict=True):
        scores = s.get_meta_info("label")["scores"]
        print(f"{s['label']:>8}  {review}   scores={ {k: round(v, 3) for k, v in scores.items()} }")
    return states


if __name__ == "__main__":
    main()
