"""Writes the two shipped text datasets, deterministically, from small grammars.

    python core/datasets/make_text_datasets.py [OUTPUT_DIR]

``tiny_corpus.txt``: paragraphs of simple English-like sentences (subjects agree
with their verbs in number, and sums of small numbers are right).
``tiny_sentiment.csv``: short product reviews, ``text,label``; the label is
``positive`` when the review holds more words of the positive list than of the
negative list, else ``negative`` (a review holds 1, 3 or 5 such words, so there
are no ties). Every word list is written out below; nothing is taken from other texts.

Draws use only ``random.Random(seed).random()``, whose sequence Python keeps the same
across versions, so the files are the same on every machine.
"""

from __future__ import annotations

import csv
import io
import random
import sys
from pathlib import Path

CORPUS_SEED = 1
CORPUS_PARAGRAPHS = 1_400
SENTIMENT_SEED = 2
SENTIMENT_ROWS = 2_000

ANIMALS = [
    ("fox", "foxes"), ("dog", "dogs"), ("cat", "cats"), ("bird", "birds"), ("horse", "horses"),
    ("goat", "goats"), ("owl", "owls"), ("frog", "frogs"), ("mouse", "mice"), ("bear", "bears"),
]  # fmt: skip
ADJECTIVES = [
    "old", "young", "small", "big", "quiet", "brave", "lazy", "clever", "hungry", "happy",
    "grey", "brown", "little", "tired",
]  # fmt: skip
NAMES = ["anna", "tom", "mara", "leo", "ida", "sam", "nora", "ben"]
PLACES = [
    "river", "forest", "hill", "garden", "village", "field", "bridge", "lake", "barn", "road",
]  # fmt: skip
OBJECTS = ["apple", "stone", "ball", "basket", "bell", "lamp", "book", "stick", "cup", "map"]
# (singular, plural) forms of transitive and intransitive verbs
TRANSITIVE = [
    ("sees", "see"), ("finds", "find"), ("carries", "carry"), ("likes", "like"),
    ("watches", "watch"), ("drops", "drop"), ("holds", "hold"), ("wants", "want"),
]  # fmt: skip
INTRANSITIVE = [
    ("runs", "run"), ("walks", "walk"), ("sleeps", "sleep"), ("sings", "sing"),
    ("waits", "wait"), ("plays", "play"), ("sits", "sit"), ("jumps", "jump"),
]  # fmt: skip
PREPOSITIONS = ["near", "by", "across", "behind", "over", "under", "beside", "along"]
TIMES = [
    "in the morning", "at night", "after the rain", "before dinner", "every day",
    "in the spring", "on sunday", "at noon",
]  # fmt: skip
NUMBERS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
]  # fmt: skip

PRODUCTS = [
    "kettle", "lamp", "chair", "phone", "jacket", "backpack", "blender", "printer", "tent",
    "bicycle", "watch", "toaster", "keyboard", "speaker", "umbrella", "mattress",
]  # fmt: skip
POSITIVE = [
    "great", "excellent", "lovely", "reliable", "sturdy", "comfortable", "fast", "wonderful",
    "perfect", "pleasant", "solid", "brilliant", "handy", "superb",
]  # fmt: skip
NEGATIVE = [
    "awful", "broken", "flimsy", "slow", "disappointing", "noisy", "useless", "terrible",
    "cheap", "faulty", "poor", "horrible", "clumsy", "dreadful",
]  # fmt: skip
OPINIONS = [
    "the {product} is {word}.", "it feels {word}.", "honestly {word}.",
    "the build is {word}.", "delivery was {word}.", "overall this {product} is {word}.",
    "my friend says it is {word}.", "the design looks {word}.",
]  # fmt: skip
FILLERS = [
    "i bought it last {day}.", "it arrived on {day}.", "the box was {colour}.",
    "i use it every {day}.", "it came in {colour}.", "i ordered the {colour} one.",
]  # fmt: skip
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
COLOURS = ["red", "blue", "green", "black", "white", "grey", "yellow"]


class _Draw:
    """Choices from ``random.Random(seed).random()`` alone (stable across Python versions)."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)

    def below(self, n: int) -> int:
        return min(int(self._random.random() * n), n - 1)

    def pick(self, items: list):
        return items[self.below(len(items))]

    def chance(self, p: float) -> bool:
        return self._random.random() < p


def _subject(draw: _Draw) -> tuple[str, bool]:
    """A noun phrase and whether it is plural."""
    kind = draw.below(4)
    if kind == 0:
        return draw.pick(NAMES), False
    singular, plural = draw.pick(ANIMALS)
    is_plural = draw.chance(0.4)
    noun = plural if is_plural else singular
    if kind == 1:
        return f"the {noun}", is_plural
    return f"the {draw.pick(ADJECTIVES)} {noun}", is_plural


def _sentence(draw: _Draw) -> str:
    kind = draw.below(10)
    if kind == 0:
        a, b = draw.below(10), draw.below(9)
        return f"{NUMBERS[a]} and {NUMBERS[b]} make {NUMBERS[a + b]}."
    subject, plural = _subject(draw)
    if kind < 5:
        verb = draw.pick(TRANSITIVE)[1 if plural else 0]
        phrase = f"{subject} {verb} the {draw.pick(OBJECTS)}"
    else:
        verb = draw.pick(INTRANSITIVE)[1 if plural else 0]
        phrase = f"{subject} {verb} {draw.pick(PREPOSITIONS)} the {draw.pick(PLACES)}"
    if draw.chance(0.35):
        phrase += f" {draw.pick(TIMES)}"
    if draw.chance(0.2):
        other, other_plural = _subject(draw)
        verb = draw.pick(INTRANSITIVE)[1 if other_plural else 0]
        phrase += f" and {other} {verb}"
    return phrase + "."


def tiny_corpus(paragraphs: int = CORPUS_PARAGRAPHS, seed: int = CORPUS_SEED) -> str:
    draw = _Draw(seed)
    lines = []
    for _ in range(paragraphs):
        sentences = [_sentence(draw) for _ in range(3 + draw.below(4))]
        lines.append(" ".join(s[0].upper() + s[1:] for s in sentences))
    return "\n".join(lines) + "\n"


def _review(draw: _Draw) -> tuple[str, str]:
    product = draw.pick(PRODUCTS)
    opinions = 1 + 2 * draw.below(3)  # 1, 3 or 5
    lean = draw.below(101) / 100  # how likely each opinion is positive, per review
    words = [
        draw.pick(POSITIVE) if draw.chance(lean) else draw.pick(NEGATIVE) for _ in range(opinions)
    ]
    sentences = [draw.pick(OPINIONS).format(product=product, word=w) for w in words]
    for _ in range(draw.below(3)):
        filler = draw.pick(FILLERS).format(day=draw.pick(DAYS), colour=draw.pick(COLOURS))
        sentences.insert(draw.below(len(sentences) + 1), filler)
    positive = sum(w in POSITIVE for w in words)
    label = "positive" if positive > opinions - positive else "negative"
    return " ".join(sentences), label


def tiny_sentiment(rows: int = SENTIMENT_ROWS, seed: int = SENTIMENT_SEED) -> str:
    draw = _Draw(seed)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["text", "label"])
    for _ in range(rows):
        writer.writerow(_review(draw))
    return buffer.getvalue()


def main(directory: Path) -> None:
    (directory / "tiny_corpus.txt").write_bytes(tiny_corpus().encode())
    (directory / "tiny_sentiment.csv").write_bytes(tiny_sentiment().encode())


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
