"""Datasets of a team: built-ins registered at start, uploads stored as new versions."""

from __future__ import annotations

import csv
import functools
import io
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, ScalarSelect, Select, func, or_, select
from sqlalchemy.orm import Session

from core.data import (
    BUILTIN_DATASETS,
    Dataset,
    DatasetUnavailable,
    dataset_from_arrays,
    load_dataset,
    load_npz,
)
from core.text import (
    TEXT_CLASSIFICATION,
    TEXT_LM,
    Tokenizer,
    text_dataset_from_corpus,
    text_dataset_from_csv,
)
from service.artifacts import ArtifactStore
from service.db import begin_write
from service.models import DatasetVersion, Team

log = logging.getLogger(__name__)

UPLOAD_KINDS = ("npz", "csv", "txt")
#: Kinds kept as the uploaded file and rebuilt on load (the tokenizer is derived from it).
TEXT_KINDS = (TEXT_LM, TEXT_CLASSIFICATION)
LABEL_COLUMN = "label"


class DatasetError(ValueError):
    """An upload that is not a valid dataset; the message says why."""


@dataclass(frozen=True)
class ParsedUpload:
    dataset: Dataset
    #: What the store keeps: normalised ``.npz`` for arrays, the file itself for text.
    stored: bytes


def register_builtins(*, session: Session) -> list[str]:
    """Record every built-in dataset available on this machine (once)."""
    registered = []
    for name in BUILTIN_DATASETS:
        exists = session.scalars(
            select(DatasetVersion).where(
                DatasetVersion.team_id.is_(None), DatasetVersion.name == name
            )
        ).first()
        if exists is not None and exists.label_shape is not None:
            registered.append(name)
            continue
        try:
            described = _describe_builtin(name)
        except DatasetUnavailable as exc:
            log.info("built-in dataset %s not available: %s", name, exc)
            if exists is not None:
                registered.append(name)
            continue
        if exists is None:
            session.add(
                DatasetVersion(team_id=None, name=name, version=1, builtin=True, **described)
            )
        else:  # registered before the row said its targets
            exists.label_shape = described["label_shape"]
            exists.vocab_size = described["vocab_size"]
        registered.append(name)
    session.commit()
    return registered


@functools.cache
def _describe_builtin(name: str) -> dict[str, Any]:
    """A built-in dataset's row, read once a process (the files do not change; one
    that is not installed is looked for again next time)."""
    dataset = load_dataset(name)
    test_samples = len(dataset.X_test) if dataset.X_test is not None else 0
    label_shape, vocab_size = targets_of(dataset)
    return {
        "kind": dataset.kind,
        "input_shape": list(dataset.input_shape),
        "num_classes": dataset.num_classes,
        "num_samples": len(dataset.X) + test_samples,
        "label_shape": list(label_shape),
        "vocab_size": vocab_size,
    }


def targets_of(dataset: Dataset) -> tuple[tuple[int, ...], int | None]:
    """The shape of one sample's targets (() a label or a number, (time,) a next token
    per position, (k,) k numbers), and how many token ids a text dataset's inputs use
    (None for other datasets, or a text dataset without its tokenizer)."""
    if dataset.kind == TEXT_LM:
        return tuple(dataset.input_shape), dataset.num_classes
    if dataset.kind == TEXT_CLASSIFICATION:
        tokenizer = dataset.meta.get("tokenizer")
        if not isinstance(tokenizer, dict):
            return (), None
        return (), Tokenizer.from_json(tokenizer).vocab_size
    if dataset.num_classes is not None:
        return (), None
    return tuple(int(d) for d in dataset.y.shape[1:]), None


def parse_upload(data: bytes, *, kind: str, name: str) -> ParsedUpload:
    """Validate an upload: ``.npz`` (X, y), ``.csv`` (numeric columns and a label, or
    ``text,label``) or a ``.txt`` corpus for language modelling."""
    try:
        if kind == "npz":
            dataset = load_npz(data, name=name)
        elif kind == "csv" and _is_labelled_text(data):
            dataset = text_dataset_from_csv(data, name=name)
        elif kind == "csv":
            dataset = _dataset_from_csv(data, name=name)
        elif kind == "txt":
            dataset = text_dataset_from_corpus(data, name=name)
        else:
            raise DatasetError(f"unsupported format {kind!r}; expected one of {UPLOAD_KINDS}")
    except (ValueError, KeyError, OSError) as exc:
        raise DatasetError(str(exc)) from None
    if dataset.kind in TEXT_KINDS:
        return ParsedUpload(dataset=dataset, stored=data)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, X=dataset.X, y=dataset.y)
    return ParsedUpload(dataset=dataset, stored=buffer.getvalue())


def _is_labelled_text(data: bytes) -> bool:
    """A CSV whose header names a ``text`` column holds texts, not numbers."""
    first_line = data.split(b"\n", 1)[0].decode("utf-8", errors="replace")
    return "text" in [cell.strip().lower() for cell in first_line.split(",")]


def _dataset_from_csv(data: bytes, *, name: str) -> Dataset:
    """Numeric columns and a ``label`` column (or the last one) holding class indices."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DatasetError("a .csv dataset must be UTF-8 text") from None
    rows = list(csv.reader(io.StringIO(text)))
    if len(rows) < 2:
        raise DatasetError("a .csv dataset needs a header row and at least one data row")
    header, body = rows[0], rows[1:]
    label_index = header.index(LABEL_COLUMN) if LABEL_COLUMN in header else len(header) - 1
    try:
        table = np.array([[float(cell) for cell in row] for row in body], dtype=np.float64)
    except ValueError as exc:
        raise DatasetError(f"every .csv cell must be a number: {exc}") from None
    if table.ndim != 2 or table.shape[1] != len(header) or table.shape[1] < 2:
        raise DatasetError("every .csv row needs as many cells as the header, at least two")
    labels = table[:, label_index]
    features = np.delete(table, label_index, axis=1)
    if np.all(labels == np.round(labels)):
        return dataset_from_arrays(features, labels.astype(np.int64), name=name)
    return dataset_from_arrays(features, labels, name=name)


def create_version(
    *, session: Session, store: ArtifactStore, team: Team, name: str, upload: ParsedUpload
) -> DatasetVersion:
    """Store an upload as the next version of ``name`` for ``team``."""
    sha256 = store.put(upload.stored)
    begin_write(session)
    # Versions are numbered per team: hold the team's row so two uploads cannot
    # both take the same number (SQLite already holds its write lock).
    session.execute(select(Team.id).where(Team.id == team.id).with_for_update())
    latest = session.scalar(
        select(func.max(DatasetVersion.version)).where(
            DatasetVersion.team_id == team.id, DatasetVersion.name == name
        )
    )
    dataset = upload.dataset
    label_shape, vocab_size = targets_of(dataset)
    version = DatasetVersion(
        team_id=team.id,
        name=name,
        version=(latest or 0) + 1,
        kind=dataset.kind,
        builtin=False,
        sha256=sha256,
        input_shape=list(dataset.input_shape),
        num_classes=dataset.num_classes,
        num_samples=len(dataset.X),
        label_shape=list(label_shape),
        vocab_size=vocab_size,
    )
    session.add(version)
    session.commit()
    return version


def visible(team: Team) -> ColumnElement[bool]:
    """Datasets a team may use: its own and the built-ins."""
    return _visible_to(team.id)


def _visible_to(team_id: int | ColumnElement[int]) -> ColumnElement[bool]:
    return or_(DatasetVersion.team_id == team_id, DatasetVersion.team_id.is_(None))


def _resolution(
    column: Any,
    *,
    team_id: int | ColumnElement[int],
    name: str | ColumnElement[str],
    version: int | ColumnElement[int] | None,
) -> Select[tuple[Any]]:
    query = select(column).where(_visible_to(team_id), DatasetVersion.name == name)
    if version is not None:
        query = query.where(DatasetVersion.version == version)
    # the team's own uploads first, then the newest version
    return query.order_by(DatasetVersion.team_id.is_(None), DatasetVersion.version.desc()).limit(1)


def resolve_version(
    *, session: Session, team: Team, name: str, version: int | None
) -> DatasetVersion | None:
    """``name`` at ``version``, or its latest version; a team's upload shadows a built-in."""
    query = _resolution(DatasetVersion, team_id=team.id, name=name, version=version)
    return session.scalars(query).first()


def resolved_id(
    *,
    team_id: int | ColumnElement[int],
    name: str | ColumnElement[str],
    version: int | ColumnElement[int] | None,
) -> ScalarSelect[Any]:
    """The id of the version :func:`resolve_version` picks, as a subquery: a statement
    that acts on a resolution made earlier checks with it that it still holds."""
    query = _resolution(DatasetVersion.id, team_id=team_id, name=name, version=version)
    return query.scalar_subquery()


def list_versions(*, session: Session, team: Team, name: str | None = None) -> list[DatasetVersion]:
    query = select(DatasetVersion).where(visible(team))
    if name is not None:
        query = query.where(DatasetVersion.name == name)
    return list(session.scalars(query.order_by(DatasetVersion.name, DatasetVersion.version)))


def load_version(*, store: ArtifactStore, version: DatasetVersion) -> Dataset:
    """The arrays of a dataset version (a built-in from its loader, an upload from the store)."""
    if version.builtin:
        return load_dataset(version.name)
    assert version.sha256 is not None
    data = store.get(version.sha256)
    if version.kind == TEXT_LM:
        return text_dataset_from_corpus(data, name=version.name)
    if version.kind == TEXT_CLASSIFICATION:
        return text_dataset_from_csv(data, name=version.name)
    return load_npz(data, name=version.name)
