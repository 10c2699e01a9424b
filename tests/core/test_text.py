"""Tokenizers, text datasets, the vocabulary in checkpoints, and what text models learn."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import core
from core import DatasetUnavailable, Trainer, fit, load_dataset
from core.checkpoint import from_npz_bytes
from core.datasets.make_text_datasets import NEGATIVE, POSITIVE, tiny_corpus, tiny_sentiment
from core.spec import TrainingSpec
from core.text import (
    FORTUNES_DIR,
    PAD_ID,
    UNK_ID,
    Tokenizer,
    build_tokenizer,
    encode_batch,
    generate,
    generate_ids,
    load_fortunes,
    read_fortunes,
    sample_next,
    strike_through,
    text_dataset_from_corpus,
    text_dataset_from_csv,
    tokenizer_from_state,
)

DATASETS_DIR = Path(core.__file__).parent / "datasets"

# --- tokenizers -----------------------------------------------------------------------------


def test_char_tokenizer_round_trip_and_unknown_characters() -> None:
    tok = build_tokenizer(["abracadabra!"], "char")
    assert tok.tokens[:2] == ("<pad>", "<unk>")
    assert tok.tokens[2:] == ("a", "b", "r", "!", "c", "d")  # by frequency, ties by text
    ids = tok.encode("cab!")
    assert ids.dtype == np.int64
    assert ids.tolist() == [6, 2, 3, 5]
    assert tok.decode(ids) == "cab!"
    assert tok.encode("ax é").tolist() == [2, UNK_ID, UNK_ID, UNK_ID]
    assert tok.decode([2, UNK_ID, PAD_ID, 3]) == "a\ufffdb"
    assert tok.encode("").tolist() == []


def test_word_tokenizer_lowercases_splits_punctuation_and_caps_the_vocabulary() -> None:
    texts = ["The cat sat. The cat ran!", "A dog sat, the dog ran."]
    tok = build_tokenizer(texts, "word", max_vocab=6)
    # 'the' (3), then 'cat', 'dog', 'ran', 'sat' and '.' (2 each) ranked by text, capped at 6
    assert tok.tokens == ("<pad>", "<unk>", "the", ".", "cat", "dog")
    assert tok.split("The cat, sat.") == ["the", "cat", ",", "sat", "."]
    assert tok.encode("the dog SAT.").tolist() == [2, 5, UNK_ID, 3]
    assert tok.decode(tok.encode("The cat.")) == "the cat ."
    assert build_tokenizer(texts, "word").vocab_size == 2 + 9


def test_tokenizer_json_round_trip_and_validation() -> None:
    tok = build_tokenizer(["hello world"], "word", lowercase=False)
    again = Tokenizer.from_json(tok.to_json())
    assert again == tok
    assert again.encode("hello there").tolist() == tok.encode("hello there").tolist()
    with pytest.raises(ValueError, match="starts with"):
        Tokenizer(kind="char", tokens=("a", "b"))
    with pytest.raises(ValueError, match="'char' or 'word'"):
        Tokenizer(kind="byte", tokens=("<pad>", "<unk>"))  # type: ignore[arg-type]


def test_encode_batch_pads_and_cuts() -> None:
    tok = build_tokenizer(["abc"], "char")
    batch = encode_batch(tok, ["ab", "abcabc", ""], 4)
    a, b, c = tok.encode("abc").tolist()
    assert batch.tolist() == [[a, b, 0, 0], [a, b, c, a], [0, 0, 0, 0]]


# --- datasets -------------------------------------------------------------------------------


def test_corpus_windows_are_next_token_pairs() -> None:
    text = "".join(f"line {i} of the corpus\n" for i in range(60))
    data = text_dataset_from_corpus(text.encode(), name="lines", context=16, test_fraction=0.2)
    tok = Tokenizer.from_json(data.meta["tokenizer"])
    assert data.kind == "text_lm" and data.meta["context"] == 16
    assert data.input_shape == (16,) and data.num_classes == tok.vocab_size
    assert data.X.shape == data.y.shape and data.X.dtype == np.int64
    np.testing.assert_array_equal(data.y[:, :-1], data.X[:, 1:])
    np.testing.assert_array_equal(data.y[:-1, -1], data.X[1:, 0])
    # Windows are consecutive stretches of the training text; the test split is its end.
    train_text = tok.decode(np.concatenate([data.X.reshape(-1), data.y[-1, -1:]]))
    assert text.startswith(train_text)
    assert data.X_test is not None and data.y_test is not None
    assert tok.decode(data.X_test[-1]) in text[int(len(text) * 0.8) - 1 :]


def test_corpus_vocabulary_comes_from_the_training_part_only() -> None:
    text = "abab\n" * 40 + "xyz\n" * 10
    data = text_dataset_from_corpus(text, context=4, test_fraction=0.2)
    tok = Tokenizer.from_json(data.meta["tokenizer"])
    assert "x" not in tok.tokens
    assert data.X_test is not None and (data.X_test == UNK_ID).any()


def test_corpus_errors() -> None:
    with pytest.raises(ValueError, match="UTF-8"):
        text_dataset_from_corpus(b"\xff\xfe bad", context=2)
    with pytest.raises(ValueError, match="too short"):
        text_dataset_from_corpus("tiny", context=64, test_fraction=0.0)


def _csv(rows: list[tuple[str, str]], header: tuple[str, str] = ("text", "label")) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def test_labelled_csv_becomes_padded_ids_and_classes() -> None:
    rows = [(f"{'good ' * (i % 3 + 1)}item number {i}", "10" if i % 2 else "2") for i in range(40)]
    data = text_dataset_from_csv(_csv(rows), name="labelled", max_len=6, test_fraction=0.25)
    assert data.kind == "text_classification"
    assert data.class_names == ("2", "10")  # integer labels in numeric order
    assert data.num_classes == 2
    assert len(data.X) == 30 and data.X_test is not None and len(data.X_test) == 10
    assert data.input_shape == (6,) and data.meta["max_len"] == 6  # cut at max_len
    tok = Tokenizer.from_json(data.meta["tokenizer"])
    # The two splits hold every row once: its text cut and padded, and its label.
    texts = [text for text, _ in rows]
    expected = sorted(
        (tuple(ids), data.class_names.index(label))
        for ids, (_, label) in zip(encode_batch(tok, texts, 6), rows, strict=True)
    )
    got = sorted(
        (tuple(ids), int(label))
        for X, y in ((data.X, data.y), (data.X_test, data.y_test))
        for ids, label in zip(X, y, strict=True)
    )
    assert got == expected
    # A short text is padded.
    short = text_dataset_from_csv(_csv([("a b", "x"), ("c", "y")]), test_fraction=0.0)
    assert short.input_shape == (2,) and short.X.tolist()[1][1] == PAD_ID


def test_labelled_csv_split_is_seeded_and_vocabulary_is_training_only() -> None:
    rows = [(f"word{i} shared", "a" if i % 2 else "b") for i in range(20)]
    one = text_dataset_from_csv(_csv(rows), test_fraction=0.25, seed=3)
    two = text_dataset_from_csv(_csv(rows), test_fraction=0.25, seed=3)
    np.testing.assert_array_equal(one.X, two.X)
    tok = Tokenizer.from_json(one.meta["tokenizer"])
    assert one.X_test is not None
    # Each test row's own word was never seen in training: it is <unk>.
    assert (one.X_test[:, 0] == UNK_ID).all()
    assert tok.vocab_size == 2 + 1 + len(one.X)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "header row"),
        (_csv([("a", "x")], header=("body", "label")), "columns 'text' and 'label'"),
        (_csv([("a", "x"), ("b", "x")]), "two distinct labels"),
        (_csv([("a", "x")]), "at least two rows"),
        (b"text,label\na,x,extra\nb,y\n", "line 2"),
        (b"text,label\n\xff,x\n", "UTF-8"),
    ],
    ids=["empty", "no-text-column", "one-class", "one-row", "ragged", "not-utf8"],
)
def test_labelled_csv_errors(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        text_dataset_from_csv(data)


def test_builtin_text_datasets_by_name() -> None:
    corpus = load_dataset("tiny_corpus")
    assert corpus.kind == "text_lm" and corpus.input_shape == (64,)
    assert corpus.X.shape[0] > 3000 and corpus.X_test is not None
    sentiment = load_dataset("tiny_sentiment")
    assert sentiment.kind == "text_classification"
    assert sentiment.class_names == ("negative", "positive")
    assert (
        len(sentiment.X) == 1600 and sentiment.X_test is not None and len(sentiment.X_test) == 400
    )
    assert 0.45 < sentiment.y.mean() < 0.55


def test_shipped_files_are_what_the_generator_writes() -> None:
    assert (DATASETS_DIR / "tiny_corpus.txt").read_bytes() == tiny_corpus().encode()
    assert (DATASETS_DIR / "tiny_sentiment.csv").read_bytes() == tiny_sentiment().encode()
    assert (DATASETS_DIR / "LICENSE.tiny_corpus").is_file()
    assert (DATASETS_DIR / "LICENSE.tiny_sentiment").is_file()


def test_sentiment_labels_follow_the_stated_rule() -> None:
    """positive exactly when a review holds more positive-list words than negative-list ones."""
    reader = csv.DictReader(io.StringIO((DATASETS_DIR / "tiny_sentiment.csv").read_text()))
    for row in reader:
        words = re.findall(r"\w+", row["text"])
        positive = sum(w in POSITIVE for w in words)
        negative = sum(w in NEGATIVE for w in words)
        assert positive != negative
        assert row["label"] == ("positive" if positive > negative else "negative")


# --- fortunes -------------------------------------------------------------------------------


def test_fortunes_missing_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="apt-get install fortunes"):
        load_fortunes(tmp_path / "absent")
    with pytest.raises(DatasetUnavailable, match="apt-get install fortunes"):
        load_fortunes(tmp_path)  # a directory without fortunes


def test_fortunes_files_are_split_on_percent_lines(tmp_path: Path) -> None:
    (tmp_path / "wisdom").write_bytes(
        b"First fortune.\n%\nSecond,\n  two lines.\n%\n%\nThird _\x08i_\x08s underlined.\n%\n"
    )
    (tmp_path / "wisdom.dat").write_bytes(b"\x00\x00\x00\x02binary index")
    (tmp_path / "wisdom.u8").write_bytes(b"Not read.\n%\n")
    (tmp_path / "off").mkdir()
    (tmp_path / "off" / "rude").write_bytes(b"Never read.\n%\n")
    (tmp_path / "zen").write_bytes(b"Last one, without a final percent line")
    assert read_fortunes(tmp_path) == [
        "First fortune.",
        "Second,\n  two lines.",
        "Third is underlined.",
        "Last one, without a final percent line",
    ]


def test_strike_through_keeps_the_letters() -> None:
    assert strike_through("*___\b\b\band* fresher") == "*and* fresher"
    assert strike_through("_\bI satisfies") == "I satisfies"
    assert strike_through("Honor'\be") == "Honore"


@pytest.mark.skipif(
    not (FORTUNES_DIR / "fortunes").is_file(), reason="fortunes needs 'apt-get install fortunes'"
)
def test_fortunes_builtin_is_a_character_corpus() -> None:
    data = load_dataset("fortunes")
    tok = Tokenizer.from_json(data.meta["tokenizer"])
    assert data.kind == "text_lm" and tok.kind == "char" and data.input_shape == (64,)
    tokens = data.X.size + (data.X_test.size if data.X_test is not None else 0)
    assert 2_000_000 < tokens < 3_500_000
    assert "\b" not in tok.tokens
    assert "%" in tok.decode(data.X[:20].reshape(-1))


# --- the vocabulary travels with the model ------------------------------------------------


def _sentiment_job(layers: list[dict[str, Any]], epochs: int) -> dict[str, Any]:
    return {
        "name": "sentiment",
        "dataset": {"name": "tiny_sentiment"},
        "model": {"layers": layers, "loss": "softmax_cross_entropy"},
        "optimizer": {"type": "adam", "lr": 0.01},
        "training": {"epochs": epochs, "batch_size": 32, "validation_split": 0.1, "seed": 0},
    }


def test_checkpoint_carries_the_vocabulary_to_prediction() -> None:
    data = load_dataset("tiny_sentiment")
    tok = Tokenizer.from_json(data.meta["tokenizer"])
    layers = [
        {"type": "embedding", "vocab_size": tok.vocab_size, "dim": 4},
        {"type": "mean_pool"},
        {"type": "dense", "units": 2},
    ]
    checkpoints: list[bytes] = []
    result = fit(
        _sentiment_job(layers, epochs=1), data, on_checkpoint=lambda _, b: checkpoints.append(b)
    )
    state = from_npz_bytes(checkpoints[-1])
    assert tokenizer_from_state(state) == tok

    restored = Trainer(
        model_spec=result.trainer.model.spec,
        optimizer_spec={"type": "adam", "lr": 0.01},
        training=TrainingSpec(),
        input_shape=data.input_shape,
        num_classes=2,
    )
    restored.load(checkpoints[-1])
    assert restored.dataset_meta == data.meta
    reviews = ["the kettle is superb. delivery was lovely.", "it feels awful. honestly broken."]
    saved_tok = Tokenizer.from_json(restored.dataset_meta["tokenizer"])
    ids = encode_batch(saved_tok, reviews, restored.dataset_meta["max_len"])
    np.testing.assert_array_equal(restored.predict(ids), result.trainer.predict(ids))


def test_image_checkpoints_carry_no_dataset_metadata() -> None:
    trainer = Trainer(
        model_spec={"layers": [{"type": "dense", "units": 2}], "loss": "mse"},
        optimizer_spec={"type": "sgd", "lr": 0.1},
        training=TrainingSpec(),
        input_shape=(3,),
        num_classes=None,
    )
    assert "dataset/meta" not in trainer.state_dict()
    assert tokenizer_from_state(trainer.state_dict()) is None


# --- what text models learn -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "body",
    [
        [{"type": "mean_pool"}],
        [
            {"type": "positional_embedding", "max_len": 64},
            {"type": "transformer_block", "heads": 2, "causal": False, "mlp_ratio": 2},
            {"type": "mean_pool"},
        ],
    ],
    ids=["mean-pool", "transformer"],
)
def test_text_classifier_learns_the_sentiment_rule(body: list[dict[str, Any]]) -> None:
    """Chance is 0.5 (1,012 positive, 988 negative); the held-out 400 reviews reach > 0.9."""
    data = load_dataset("tiny_sentiment")
    vocab = len(data.meta["tokenizer"]["tokens"])
    layers = [
        {"type": "embedding", "vocab_size": vocab, "dim": 16},
        *body,
        {"type": "dense", "units": 2},
    ]
    with threadpool_limits(1):
        result = fit(_sentiment_job(layers, epochs=6), data)
    assert result.test["test_accuracy"] > 0.9, result.test
    assert result.history[-1]["val_accuracy"] > 0.9


CONTEXT = 64


@pytest.fixture(scope="module")
def char_lm() -> Iterator[tuple[Any, Tokenizer, dict[str, float], float]]:
    """A character transformer (2 blocks, width 64, 4 heads, context 64) fit on tiny_corpus.

    Four epochs of 95 steps (batch 32, AdamW, cosine schedule): about 15 s on one core.
    """
    data = load_dataset("tiny_corpus")
    vocab = data.num_classes
    assert vocab is not None
    job = {
        "name": "char-lm",
        "dataset": {"name": "tiny_corpus"},
        "model": {
            "layers": [
                {"type": "embedding", "vocab_size": vocab, "dim": 64},
                {"type": "positional_embedding", "max_len": CONTEXT},
                {"type": "transformer_block", "heads": 4},
                {"type": "transformer_block", "heads": 4},
                {"type": "layernorm"},
                {"type": "dense", "units": vocab},
            ],
            "loss": "softmax_cross_entropy",
        },
        "optimizer": {
            "type": "adamw",
            "lr": 0.004,
            "schedule": {"type": "cosine", "warmup_steps": 20},
        },
        "training": {"epochs": 4, "batch_size": 32, "validation_split": 0.1, "seed": 0},
    }
    counts = np.bincount(data.y.reshape(-1), minlength=vocab)
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())
    with threadpool_limits(1):
        result = fit(job, data)
        tok = Tokenizer.from_json(data.meta["tokenizer"])
        yield result.model, tok, {**result.history[-1], **result.test}, unigram_entropy


@pytest.mark.slow
def test_char_transformer_beats_the_unigram_baseline(char_lm) -> None:
    """Unigram entropy of tiny_corpus: 2.95 nats per character. After training, the
    validation loss is about 0.91 and the test loss about 0.90 (ratio 0.31)."""
    _, _, metrics, unigram_entropy = char_lm
    assert 2.8 < unigram_entropy < 3.1
    assert metrics["val_loss"] < 0.5 * unigram_entropy, metrics
    assert metrics["test_loss"] < 0.5 * unigram_entropy, metrics
    assert metrics["val_accuracy"] > 0.6  # per character


@pytest.mark.slow
def test_greedy_generation_is_the_argmax_continuation(char_lm) -> None:
    model, tok, _, _ = char_lm
    prompt = "The brave fox"
    text = generate(model, tok, prompt, max_new_tokens=40)
    ids = tok.encode(prompt).tolist()
    for _ in range(40):
        logits = model.forward(np.array([ids[-CONTEXT:]]), training=False)[0, -1]
        ids.append(int(np.argmax(logits[2:])) + 2)  # <pad> and <unk> are never produced
    assert text == tok.decode(ids[len(tok.encode(prompt)) :])
    # The continuation is made of the corpus's words, mostly.
    corpus_words = set(re.findall(r"[a-z]+", tiny_corpus().lower()))
    words = re.findall(r"[a-z]+", (prompt + text).lower())
    assert sum(w in corpus_words for w in words) >= 0.6 * len(words), text


@pytest.mark.slow
def test_sampling_is_seeded_and_longer_than_the_context(char_lm) -> None:
    model, tok, _, _ = char_lm
    first = generate(model, tok, "The", max_new_tokens=80, temperature=0.8, seed=1)
    again = generate(model, tok, "The", max_new_tokens=80, temperature=0.8, seed=1)
    other = generate(model, tok, "The", max_new_tokens=80, temperature=0.8, seed=2)
    assert first == again and first != other
    assert len(first) == 80
    # top_k=1 keeps only the most likely token: the greedy continuation.
    assert generate(model, tok, "The", max_new_tokens=20, temperature=1.5, top_k=1) == generate(
        model, tok, "The", max_new_tokens=20
    )
    ids = generate_ids(model, tok.encode("The"), max_new_tokens=5, temperature=1.0, seed=4)
    assert len(ids) == 5 and min(ids) >= 2


def test_sample_next_rules() -> None:
    logits = np.array([0.0, 1.0, 3.0, 2.0])
    assert sample_next(logits) == 2
    rng = np.random.default_rng(0)
    draws = [sample_next(logits, temperature=1.0, top_k=2, rng=rng) for _ in range(200)]
    assert set(draws) == {2, 3}
    share = draws.count(2) / len(draws)
    assert abs(share - 1 / (1 + np.exp(-1.0))) < 0.1  # softmax of (3, 2)
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, temperature=-1.0)
    with pytest.raises(ValueError, match="rng"):
        sample_next(logits, temperature=1.0)


def test_generation_needs_a_prompt() -> None:
    model = core.build_model(
        {
            "layers": [
                {"type": "embedding", "vocab_size": 5, "dim": 2},
                {"type": "dense", "units": 5},
            ],
            "loss": "softmax_cross_entropy",
        },
        (4,),
    )
    with pytest.raises(ValueError, match="no tokens"):
        generate_ids(model, [], max_new_tokens=3)
