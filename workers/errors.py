"""Typed errors of worker groups, all-reduce and distributed training."""

from __future__ import annotations

import sys


class WorkersError(RuntimeError):
    """Base of every error raised by ``workers``."""


class WorkerGroupStartupError(WorkersError):
    """A worker group could not be started (an actor failed while starting)."""


class WorkerGroupStartupTimeoutError(WorkerGroupStartupError):
    """The resources of a worker group did not become available in time."""


class WorkerFailedError(WorkersError):
    """A worker process died or became unreachable while the group was running."""

    def __init__(self, message: str, *, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


class AllReduceTimeoutError(WorkersError):
    """Peers did not reach an all-reduce barrier within ``ALLREDUCE_TIMEOUT_S``."""


class BackendUnavailableError(WorkersError):
    """An all-reduce backend whose dependencies or devices are missing here."""


class SharedMemoryTooSmallError(BackendUnavailableError):
    """A node's ``/dev/shm`` has too little free space for the ``ray`` all-reduce."""


class TrainingDivergedError(WorkersError):
    """The loss or gradients became NaN or infinite too many times; ``reason`` says why."""

    def __init__(self, reason: str, *, epoch: int, step: int, count: int) -> None:
        super().__init__(
            f"training diverged {count} times, last at epoch {epoch} step {step}: {reason}"
        )
        self.reason = reason
        self.epoch = epoch
        self.step = step
        self.count = count


class TooManyWorkerFailuresError(WorkerFailedError):
    """Workers failed more often than the job's ``max_failures`` allows."""


class JobCancelledError(WorkersError):
    """Training stopped because the caller asked for cancellation."""

    def __init__(self, *, epoch: int, step: int) -> None:
        super().__init__(f"cancelled at epoch {epoch}, step {step}")
        self.epoch = epoch
        self.step = step


def root_cause(exc: BaseException) -> BaseException:
    """The exception a remote task or actor method raised, out of the ``RayTaskError``
    that wraps it at each remote call it crossed; ``exc`` itself when Ray wrapped nothing.
    """
    # An exception can only be Ray's once Ray is loaded: no need to import it here.
    ray_exceptions = sys.modules.get("ray.exceptions")
    if ray_exceptions is None:
        return exc
    while isinstance(exc, ray_exceptions.RayTaskError) and exc.cause not in (None, exc):
        exc = exc.cause
    return exc
