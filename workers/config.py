"""Tunables of the workers package, with units in their names.

Each can be overridden from the environment of the process that imports
``workers`` (the dispatcher, or a worker actor) with ``TRAINQ_<NAME>``.
"""

from __future__ import annotations

import os


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(f"TRAINQ_{name}")
    return float(raw) if raw else default


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(f"TRAINQ_{name}")
    return int(raw) if raw else default


#: How long a worker waits for its peers at an all-reduce before giving up.
ALLREDUCE_TIMEOUT_S = _env_float("ALLREDUCE_TIMEOUT_S", 60.0)
#: Size of one all-reduce bucket; a flat gradient larger than this is reduced in pieces.
ALLREDUCE_BUCKET_BYTES = _env_int("ALLREDUCE_BUCKET_BYTES", 4 * 1024 * 1024)
#: Largest shared-memory segment (slot rows plus result) that holds whole gradient rows on a
#: node, so workers compute into it and read the sum from it with no copies; larger ones
#: reduce bucket by bucket.
ALLREDUCE_RESIDENT_MAX_BYTES = _env_int("ALLREDUCE_RESIDENT_MAX_BYTES", 1 << 30)
#: Share of a node's free ``/dev/shm`` (measured when its workers start) that one
#: group's segment may take; the rest is left to other groups and processes.
ALLREDUCE_SHM_SHARE = _env_float("ALLREDUCE_SHM_SHARE", 0.5)
#: Longest sleep between two looks at a shared-memory barrier (the wait backs off up to it).
BARRIER_MAX_SLEEP_S = _env_float("BARRIER_MAX_SLEEP_S", 0.0002)
#: How long a worker group may wait for its resources and for its actors to start.
WORKER_STARTUP_TIMEOUT_S = _env_float("WORKER_STARTUP_TIMEOUT_S", 120.0)
#: Pieces a global batch is cut into in deterministic mode, whatever the number of workers.
MICRO_SHARDS = _env_int("MICRO_SHARDS", 8)
#: Worker failures a job survives (each restarts the group from the last checkpoint).
MAX_WORKER_FAILURES = _env_int("MAX_WORKER_FAILURES", 3)
#: Non-finite losses or gradients a job survives (each rolls back and skips the batch).
MAX_DIVERGENCES = _env_int("MAX_DIVERGENCES", 3)
#: Least time between two calls of a job's ``should_cancel``.
CANCEL_POLL_INTERVAL_S = _env_float("CANCEL_POLL_INTERVAL_S", 0.2)
