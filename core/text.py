"""Text: tokenizers, text datasets, and generation from a language model.

A :class:`Tokenizer` turns text into token ids and back, at the level of
characters or of words. Its vocabulary is built from a training split only,
and travels with the dataset (``Dataset.meta["tokenizer"]``) and with the
trained model (the ``dataset/meta`` entry of a checkpoint), so prediction
encodes text exactly as training did. Ids 0 and 1 are always ``<pad>`` and
``<unk>``.

Two kinds of text dataset (``Dataset.kind``):

- ``text_lm``: a corpus cut into windows of ``context`` ids, inputs ``X: (N, context)``
  and next-token targets ``y: (N, context)`` (``y[i, t] = X[i, t + 1]`` within the text);
- ``text_classification``: labelled texts padded (or cut) to ``max_len`` ids,
  ``X: (N, max_len)``, class labels ``y: (N,)``.

Built in: ``tiny_corpus`` (generated English-like sentences, shipped), ``tiny_sentiment``
(generated labelled reviews, shipped) and ``fortunes`` (Debian's ``fortunes`` package).
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np

from core.backend import to_numpy
from core.checkpoint import decode_json
from core.data import Dataset, DatasetUnavailable

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
SPECIAL_TOKENS = (PAD, UNK)

TokenizerKind = Literal["char", "word"]
TEXT_LM = "text_lm"
TEXT_CLASSIFICATION = "text_classification"

#: A word is a run of letters, digits or underscores; any other visible character
#: is a token of its own, so "good." is "good" and ".".
_WORD = re.compile(r"\w+|[^\w\s]")

DEFAULT_CONTEXT = 64
DEFAULT_MAX_LEN = 64
DEFAULT_WORD_VOCAB = 10_000
TEST_FRACTION = 0.1
LABELLED_TEST_FRACTION = 0.2
SPLIT_SEED = 0

FORTUNES_DIR = Path("/usr/share/games/fortunes")
#: Fortune files underline and accent by overstriking: characters, backspaces, more characters.
_OVERSTRUCK_LINE = re.compile(r"[^\n]*\x08[^\n]*")


# --- tokenizers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Tokenizer:
    """Token strings by id; ``tokens[0]`` is ``<pad>``, ``tokens[1]`` is ``<unk>``.

    ``char``: every character is a token. ``word``: words and punctuation marks
    (``\\w+|[^\\w\\s]``), joined by single spaces when decoded. Text is lowercased
    first when ``lowercase`` is set.
    """

    kind: TokenizerKind
    tokens: tuple[str, ...]
    lowercase: bool = False
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)
    #: Code points of the one-character tokens, sorted, and their ids (char kind).
    _char_table: tuple[np.ndarray, np.ndarray] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("char", "word"):
            raise ValueError(f"tokenizer kind must be 'char' or 'word', got {self.kind!r}")
        if tuple(self.tokens[:2]) != SPECIAL_TOKENS:
            raise ValueError(f"a vocabulary starts with {SPECIAL_TOKENS}")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("a vocabulary holds each token once")
        object.__setattr__(self, "_ids", {token: i for i, token in enumerate(self.tokens)})
        chars = sorted((ord(t), i) for i, t in enumerate(self.tokens) if len(t) == 1)
        table = (
            np.array([c for c, _ in chars], dtype=np.uint32),
            np.array([i for _, i in chars], dtype=np.int64),
        )
        object.__setattr__(self, "_char_table", table)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def split(self, text: str) -> list[str]:
        """The token strings of ``text``, before any lookup."""
        if self.lowercase:
            text = text.lower()
        return list(text) if self.kind == "char" else _WORD.findall(text)

    def encode(self, text: str) -> np.ndarray:
        """Token ids (n,) int64; a token outside the vocabulary is ``<unk>``."""
        if self.kind == "char":
            return self._encode_chars(text.lower() if self.lowercase else text)
        ids = self._ids
        return np.fromiter((ids.get(token, UNK_ID) for token in self.split(text)), dtype=np.int64)

    def _encode_chars(self, text: str) -> np.ndarray:
        """Characters to ids by a sorted table of code points: no Python loop over the text."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        keys, values = self._char_table
        if len(keys) == 0:
            return np.full(len(codes), UNK_ID, dtype=np.int64)
        where = np.minimum(np.searchsorted(keys, codes), len(keys) - 1)
        return np.where(keys[where] == codes, values[where], UNK_ID)

    def decode(self, ids: Iterable[int]) -> str:
        """Text from ids; padding is dropped, ``<unk>`` shown as U+FFFD (char) or ``<unk>``."""
        tokens = self.tokens
        unknown = "\ufffd" if self.kind == "char" else UNK
        pieces = [
            unknown if i == UNK_ID else tokens[i] for i in (int(i) for i in ids) if i != PAD_ID
        ]
        return "".join(pieces) if self.kind == "char" else " ".join(pieces)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "tokens": list(self.tokens), "lowercase": self.lowercase}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Tokenizer:
        return cls(
            kind=data["kind"], tokens=tuple(data["tokens"]), lowercase=bool(data["lowercase"])
        )


def build_tokenizer(
    texts: Iterable[str],
    kind: TokenizerKind = "char",
    *,
    max_vocab: int | None = None,
    min_count: int = 1,
    lowercase: bool | None = None,
) -> Tokenizer:
    """A vocabulary from ``texts`` (the training split): the most frequent tokens first.

    ``max_vocab`` caps the size, the two special tokens included; ties in frequency are
    broken by the token's text, so the same texts always give the same ids.
    ``lowercase`` defaults to True for words and False for characters.
    """
    if lowercase is None:
        lowercase = kind == "word"
    if max_vocab is not None and max_vocab < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"max_vocab must be at least {len(SPECIAL_TOKENS) + 1}")
    probe = Tokenizer(kind=kind, tokens=SPECIAL_TOKENS, lowercase=lowercase)
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(probe.split(text))
    for special in SPECIAL_TOKENS:
        counts.pop(special, None)
    ranked = sorted(
        (token for token, n in counts.items() if n >= min_count),
        key=lambda token: (-counts[token], token),
    )
    if max_vocab is not None:
        ranked = ranked[: max_vocab - len(SPECIAL_TOKENS)]
    return Tokenizer(kind=kind, tokens=(*SPECIAL_TOKENS, *ranked), lowercase=lowercase)


def encode_batch(tokenizer: Tokenizer, texts: Sequence[str], length: int) -> np.ndarray:
    """Texts as ids (N, length) int64: cut after ``length`` tokens, padded with ``<pad>``."""
    out = np.full((len(texts), length), PAD_ID, dtype=np.int64)
    for row, text in enumerate(texts):
        ids = tokenizer.encode(text)[:length]
        out[row, : len(ids)] = ids
    return out


def tokenizer_from_state(state: Mapping[str, Any]) -> Tokenizer | None:
    """The tokenizer saved in a checkpoint's state (``core.Trainer.state_dict``), if any."""
    if "dataset/meta" not in state:
        return None
    meta = decode_json(state["dataset/meta"])
    return Tokenizer.from_json(meta["tokenizer"]) if "tokenizer" in meta else None


# --- datasets -------------------------------------------------------------------------------


def _as_text(data: str | bytes, what: str) -> str:
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{what} must be UTF-8 text: {exc}") from None
    return data.replace("\r\n", "\n").replace("\r", "\n")


def _windows(ids: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows: inputs ids[i*c : (i+1)*c], targets shifted by one."""
    n = (len(ids) - 1) // context
    inputs = ids[: n * context].reshape(n, context)
    targets = ids[1 : n * context + 1].reshape(n, context)
    return inputs.copy(), targets.copy()


def text_dataset_from_corpus(
    text: str | bytes,
    *,
    name: str = "corpus",
    tokenizer: TokenizerKind = "char",
    context: int = DEFAULT_CONTEXT,
    max_vocab: int | None = None,
    test_fraction: float = TEST_FRACTION,
) -> Dataset:
    """A language-modelling dataset from one text (``.txt`` upload or built-in corpus).

    The last ``test_fraction`` of the text (from a line break) is the test split;
    the vocabulary is built from the rest. Both are cut into non-overlapping windows:
    ``X: (N, context)`` ids and next-token targets ``y: (N, context)``, int64.
    """
    text = _as_text(text, "a corpus")
    if not 1 <= context <= 65_536:
        raise ValueError("context must lie in [1, 65536]")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError("test_fraction must lie in [0, 1)")
    cut = len(text)
    if test_fraction > 0:
        target = int(len(text) * (1.0 - test_fraction))
        line_break = text.rfind("\n", 0, target)
        cut = line_break + 1 if line_break > 0 else target
    train_text, test_text = text[:cut], text[cut:]
    tok = build_tokenizer([train_text], tokenizer, max_vocab=max_vocab)
    X, y = _windows(tok.encode(train_text), context)
    if len(X) == 0:
        raise ValueError(
            f"the corpus is too short: its training part holds fewer than {context + 1} tokens"
        )
    X_test, y_test = _windows(tok.encode(test_text), context)
    has_test = len(X_test) > 0
    return Dataset(
        name=name,
        X=X,
        y=y,
        input_shape=(context,),
        num_classes=tok.vocab_size,
        X_test=X_test if has_test else None,
        y_test=y_test if has_test else None,
        kind=TEXT_LM,
        meta={"tokenizer": tok.to_json(), "context": context},
    )


def _read_labelled_csv(text: str) -> tuple[list[str], list[str]]:
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        raise ValueError("a labelled .csv needs a header row 'text,label'")
    columns = [h.strip().lower() for h in header]
    if "text" not in columns or "label" not in columns:
        raise ValueError(f"a labelled .csv needs columns 'text' and 'label', got {header}")
    text_col, label_col = columns.index("text"), columns.index("label")
    texts: list[str] = []
    labels: list[str] = []
    for line, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(columns):
            raise ValueError(f"line {line}: {len(row)} cells, the header has {len(columns)}")
        texts.append(row[text_col])
        labels.append(row[label_col].strip())
    return texts, labels


def _class_names(labels: list[str]) -> tuple[str, ...]:
    """Distinct labels, in numeric order when every label is an integer, else sorted."""
    distinct = set(labels)
    if all(re.fullmatch(r"-?\d+", label) for label in distinct):
        return tuple(sorted(distinct, key=int))
    return tuple(sorted(distinct))


def text_dataset_from_csv(
    data: str | bytes,
    *,
    name: str = "texts",
    tokenizer: TokenizerKind = "word",
    max_len: int = DEFAULT_MAX_LEN,
    max_vocab: int | None = DEFAULT_WORD_VOCAB,
    test_fraction: float = LABELLED_TEST_FRACTION,
    seed: int = SPLIT_SEED,
) -> Dataset:
    """A text-classification dataset from a ``text,label`` CSV.

    A seeded ``test_fraction`` of the rows is the test split; the vocabulary comes
    from the other rows. Texts become ids ``X: (N, length)`` padded with ``<pad>`` (0),
    ``length`` = the longest training text, at most ``max_len``; labels ``y: (N,)``
    index ``class_names``.
    """
    texts, labels = _read_labelled_csv(_as_text(data, "a labelled .csv"))
    if len(texts) < 2:
        raise ValueError("a labelled .csv needs at least two rows")
    class_names = _class_names(labels)
    if len(class_names) < 2:
        raise ValueError("a labelled .csv needs at least two distinct labels")
    if not 1 <= max_len <= 65_536:
        raise ValueError("max_len must lie in [1, 65536]")
    index = {label: i for i, label in enumerate(class_names)}
    y_all = np.array([index[label] for label in labels], dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(texts))
    n_test = math.ceil(len(texts) * test_fraction) if test_fraction > 0 else 0
    if n_test >= len(texts):
        raise ValueError("test_fraction leaves no training rows")
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    tok = build_tokenizer((texts[i] for i in train), tokenizer, max_vocab=max_vocab)
    longest = max(len(tok.split(texts[i])) for i in train)
    length = max(1, min(max_len, longest))
    X_all = encode_batch(tok, texts, length)
    return Dataset(
        name=name,
        X=X_all[train],
        y=y_all[train],
        input_shape=(length,),
        num_classes=len(class_names),
        class_names=class_names,
        X_test=X_all[test] if n_test else None,
        y_test=y_all[test] if n_test else None,
        kind=TEXT_CLASSIFICATION,
        meta={"tokenizer": tok.to_json(), "max_len": length},
    )


# --- built-in text datasets ----------------------------------------------------------------


def _shipped(filename: str) -> bytes:
    return resources.files("core.datasets").joinpath(filename).read_bytes()


def load_tiny_corpus() -> Dataset:
    """About 200 KB of generated sentences (``core/datasets/tiny_corpus.txt``), characters,
    context 64."""
    return text_dataset_from_corpus(_shipped("tiny_corpus.txt"), name="tiny_corpus")


def load_tiny_sentiment() -> Dataset:
    """2,000 generated reviews labelled ``negative``/``positive``
    (``core/datasets/tiny_sentiment.csv``), words, padded to the longest review."""
    return text_dataset_from_csv(_shipped("tiny_sentiment.csv"), name="tiny_sentiment")


def strike_through(line: str) -> str:
    """What a line printed with backspaces shows, keeping the letters of overstruck cells.

    ``"_\bI"`` and ``"___\b\b\band"`` (underlined) give ``"I"`` and ``"and"``;
    ``"'\be"`` (an accent) gives ``"e"``.
    """
    cells: list[str] = []
    position = 0
    for char in line:
        if char == "\b":
            position = max(position - 1, 0)
            continue
        if position == len(cells):
            cells.append(char)
        elif char.isalnum() or not cells[position].isalnum():
            cells[position] = char
        position += 1
    return "".join(cells)


def read_fortunes(directory: Path = FORTUNES_DIR) -> list[str]:
    """Every fortune of the Debian ``fortunes`` files in ``directory``, in file order.

    A file holds entries separated by lines holding only ``%``; the ``.dat`` index
    files, the ``.u8`` variants and subdirectories (such as ``off``) are skipped.
    """
    if not directory.is_dir():
        raise DatasetUnavailable(
            f"fortunes needs the files under {directory}; install them with "
            "'apt-get install fortunes'"
        )
    entries: list[str] = []
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.suffix in (".dat", ".u8"):
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        text = _OVERSTRUCK_LINE.sub(lambda m: strike_through(m.group()), text)
        for entry in re.split(r"^%[ \t]*$", text.replace("\r\n", "\n"), flags=re.MULTILINE):
            entry = entry.strip("\n")
            if entry.strip():
                entries.append(entry)
    if not entries:
        raise DatasetUnavailable(
            f"no fortunes found under {directory}; install them with 'apt-get install fortunes'"
        )
    return entries


def load_fortunes(directory: Path = FORTUNES_DIR) -> Dataset:
    """Debian's fortunes (about 2.5M characters) for a character language model, context 64.

    Entries are shuffled with a fixed seed (so the test split is drawn from every
    file) and joined as in the files, each followed by a line ``%``.
    """
    entries = read_fortunes(directory)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(entries))
    corpus = "".join(entries[i] + "\n%\n" for i in order)
    return text_dataset_from_corpus(corpus, name="fortunes")


BUILTIN_TEXT_DATASETS = {
    "tiny_corpus": load_tiny_corpus,
    "tiny_sentiment": load_tiny_sentiment,
    "fortunes": load_fortunes,
}


# --- generation -----------------------------------------------------------------------------


def sample_next(
    logits: np.ndarray,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    rng: np.random.Generator | None = None,
) -> int:
    """The next id from logits (vocab,): the argmax when ``temperature`` is 0, else a draw
    from softmax(logits / temperature), restricted to the ``top_k`` largest when given."""
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    z = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return int(np.argmax(z))
    if rng is None:
        raise ValueError("sampling with temperature > 0 needs an rng")
    z = z / temperature
    if top_k is not None and top_k < len(z):
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    return int(rng.choice(len(p), p=p))


def generate(
    model: Any,
    tokenizer: Tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 100,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    """The continuation of ``prompt`` by a causal language model (greedy when
    ``temperature`` is 0), as text.

    Each step feeds the last ``context`` ids (the model's input length) and takes
    the logits of the last position; ``<pad>`` and ``<unk>`` are never produced.
    The same ``seed`` gives the same text.
    """
    ids = generate_ids(
        model,
        tokenizer.encode(prompt),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
    )
    return tokenizer.decode(ids)


def generate_ids(
    model: Any,
    prompt_ids: Sequence[int] | np.ndarray,
    *,
    max_new_tokens: int = 100,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
) -> list[int]:
    """The ids that continue ``prompt_ids`` (see :func:`generate`)."""
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise ValueError("the prompt holds no tokens")
    context = model.input_shape[0]
    rng = np.random.default_rng(seed)
    new: list[int] = []
    for _ in range(max_new_tokens):
        window = np.asarray(ids[-context:], dtype=np.int64)[None, :]
        logits = to_numpy(model.forward(window, training=False))[0, -1].astype(np.float64)
        logits[[PAD_ID, UNK_ID]] = -np.inf
        next_id = sample_next(logits, temperature=temperature, top_k=top_k, rng=rng)
        ids.append(next_id)
        new.append(next_id)
    return new
