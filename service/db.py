"""Engines and sessions for SQLite (embedded) and PostgreSQL (a team's server)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
#: Connections per process, kept open: one for each of the 40 threads that run the
#: API's blocking work (anyio's default), so that a burst of requests does not open
#: and close PostgreSQL connections (a server process each); the overflow is for
#: requests that hold a connection while they wait for a thread.
POOL_SIZE = 40
POOL_MAX_OVERFLOW = 10
POOL_RECYCLE_S = 300

#: Execution option that makes a SQLite transaction take the write lock at BEGIN.
SQLITE_IMMEDIATE = "trainq_sqlite_immediate"


def utcnow() -> datetime:
    """Naive UTC, the one form timestamps take in both databases."""
    return datetime.now(UTC).replace(tzinfo=None)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def make_engine(url: str, **kwargs: Any) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=POOL_SIZE,
            max_overflow=POOL_MAX_OVERFLOW,
            **kwargs,
        )
        _configure_sqlite(engine)
        return engine
    # pool_recycle rather than pool_pre_ping: a ping is one more round trip per request.
    return create_engine(
        url,
        pool_recycle=POOL_RECYCLE_S,
        pool_size=POOL_SIZE,
        max_overflow=POOL_MAX_OVERFLOW,
        **kwargs,
    )


def _configure_sqlite(engine: Engine) -> None:
    # pysqlite's own transaction handling cannot BEGIN IMMEDIATE; take it over.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get(SQLITE_IMMEDIATE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def write_lock_session(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose SQLite transaction holds the write lock from its start.

    Read-then-write sequences (claiming a job) need it on SQLite, where two
    deferred transactions would both read and then one would fail to upgrade its
    lock. PostgreSQL uses ``FOR UPDATE SKIP LOCKED`` instead and ignores the option.
    """
    with factory() as session:
        session.connection(execution_options={SQLITE_IMMEDIATE: True})
        yield session


def begin_single_write(session: Session) -> Connection:
    """Start a transaction for a write that is one statement; its connection.

    On PostgreSQL the connection autocommits: the statement is its own
    transaction, with no BEGIN and COMMIT round trips around it. On SQLite it is
    :func:`begin_write`'s transaction, which holds the write lock from its start.
    """
    if session.get_bind().dialect.name == "sqlite":
        begin_write(session)
        return session.connection()
    if session.in_transaction():
        session.commit()
    return session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})


def begin_write(session: Session) -> None:
    """End the session's read transaction and start one that may write.

    On SQLite the new transaction takes the write lock at once: a transaction
    that read first and then tried to write could fail with "database is
    locked" when another connection wrote in between, busy timeout or not.
    """
    if session.get_bind().dialect.name != "sqlite":
        return  # PostgreSQL's row locks and constraints already arbitrate writers
    if session.in_transaction():
        session.commit()
    session.connection(execution_options={SQLITE_IMMEDIATE: True})
