"""Actor classes the worker tests run in Ray besides the real training worker."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from core.layers.base import add_along
from workers.allreduce import (
    AllReduce,
    AllReduceSetup,
    SharedMemoryAllReduce,
    make_allreduce,
    owned_slots,
    span_tree,
)
from workers.errors import AllReduceTimeoutError
from workers.worker import TrainWorker


class ReduceProbe:
    """One rank that does nothing but all-reduce the rows it is given."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.backend: AllReduce | None = None

    def info(self) -> Any:
        return TrainWorker(self.rank, self.world_size).info()

    def ping(self) -> int:
        return os.getpid()

    def setup_allreduce(
        self,
        setup: AllReduceSetup,
        phase: str,
        exchange: Any = None,
        *,
        vector_size: int = 1,
        dtype: str = "float32",
    ) -> None:
        if phase == "create":
            self.close()
            self.backend = make_allreduce(
                setup, rank=self.rank, vector_size=vector_size, dtype=dtype, exchange=exchange
            )
        elif phase == "attach":
            assert self.backend is not None
            self.backend.attach()
        else:
            assert self.backend is not None
            self.backend.seal()

    def segment(self) -> tuple[bool, int]:
        """Whether the ``ray`` backend's rows are resident, and its segment's size."""
        assert isinstance(self.backend, SharedMemoryAllReduce)
        return self.backend.resident_views() is not None, self.backend.layout.size

    def reduce(self, rows: np.ndarray, num_slots: int, ordered: bool = True) -> np.ndarray:
        assert self.backend is not None
        out = np.empty(rows.shape[1], rows.dtype)
        self.backend.reduce(rows, num_slots, out, ordered=ordered)
        return out

    def reduce_resident(
        self, rows: np.ndarray, num_slots: int, presummed: bool = False
    ) -> tuple[np.ndarray, bool]:
        """Write ``rows`` into the resident slot rows, reduce in place; the sum and whether
        it is finite. ``presummed``: write instead, in the row of each span's first slot,
        the rows of the span added along its tree, and NaN in the others (never read)."""
        assert self.backend is not None
        views = self.backend.resident_views()
        assert views is not None, "rows are not resident"
        mine, result = views
        for view, row in zip(mine, rows, strict=True):
            view[...] = np.nan if presummed else row
        if presummed:
            spans = self.backend.presum_spans(num_slots)
            assert spans is not None
            first = owned_slots(self.rank, self.world_size, num_slots).start
            for span in spans:
                mine[span[0] - first][...] = add_along(span_tree(span, first), rows)
        finite = self.backend.reduce_resident(num_slots, presummed=presummed)
        return result.copy(), finite

    def presum_spans(self, num_slots: int) -> list[tuple[int, int]] | None:
        assert self.backend is not None
        return self.backend.presum_spans(num_slots)

    def reduce_alone(self, rows: np.ndarray, num_slots: int) -> tuple[str, float]:
        """Reduce while the peers stay away: the error's name and the CPU seconds spent waiting."""
        started = time.process_time()
        try:
            self.reduce(rows, num_slots)
            outcome = "finished"
        except AllReduceTimeoutError as exc:
            outcome = type(exc).__name__
        return outcome, time.process_time() - started

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None


class DataProbeWorker(TrainWorker):
    """The training worker, plus a look at how it holds the dataset."""

    def data_flags(self) -> dict[str, bool]:
        X = self.data["X_train"]
        return {"writeable": bool(X.flags.writeable), "owndata": bool(X.flags.owndata)}


class FailingWorker(TrainWorker):
    """A worker whose rank 1 cannot start."""

    def __init__(self, rank: int, world_size: int) -> None:
        if rank == 1:
            raise RuntimeError("rank 1 refuses to start")
        super().__init__(rank, world_size)
