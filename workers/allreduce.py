"""All-reduce of one flat buffer per step, in a fixed order of summation.

Every backend computes the same thing. The buffer to reduce is cut into
``num_slots`` contributions (one per micro-shard in deterministic mode, one per
worker otherwise); each rank owns a contiguous run of slots
(:func:`owned_slots`) and hands in their rows. The result, on every rank, is
the sum of the slot rows along a fixed binary tree (:func:`tree_sum`): the sum
over slots ``a..b-1`` is the sum over ``a..m-1`` plus the sum over ``m..b-1``,
``m = (a + b) // 2``, down to single slots. For 8 slots:

    out = ((slot_0 + slot_1) + (slot_2 + slot_3)) + ((slot_4 + slot_5) + (slot_6 + slot_7))

element by element. Floating-point addition is not associative, so it is this
fixed tree that makes the result independent of the number of workers: the
same slots summed along the same tree give the same bits, whoever computed
them. The tree also lets a rank, or a node, add up the slots it holds before
anything leaves it wherever they form whole subtrees (with a power-of-two
number of workers and of slots they always do): then one row per node crosses
the network, not one per slot.

Backends:

``ray`` (default; Ray and NumPy only)
    Workers on one node meet in a shared-memory segment: each writes its slot
    rows, then each sums its share of the elements over all slots along the
    tree, then each copies the whole result out. With resident rows, a rank may
    instead write the sums of its whole subtrees, one row each
    (:meth:`AllReduce.presum_spans`), and the sum reads only those. Across nodes
    only the lowest rank of each node (its leader) talks, and it first sums its
    node's whole subtrees. Where gloo is installed the leaders form a gloo group and
    all-gather those partial sums, each then finishing the tree. Otherwise they
    swap them through Ray's object store so that each finishes one chunk of the
    elements (a reduce-scatter that keeps the tree), then swap the summed chunks
    (an all-gather).
``gloo``
    ``ray.util.collective`` with its gloo backend, which in Ray 2.60 is
    ``torch.distributed`` (``TorchGLOOGroup``; it needs torch, not pygloo).
    In order: each rank sums its whole subtrees, an all-gather of those, then
    the rest of the tree on every rank. Unordered (``ordered=False``): gloo's
    own all-reduce.
``nccl``
    ``ray.util.collective`` NCCL on CuPy arrays, one GPU per worker (needs
    CuPy and torch); the same two paths as gloo.

Large buffers are reduced in buckets of ``ALLREDUCE_BUCKET_BYTES``. On one
node's shared memory the rows may instead be *resident*: when every slot row
and the result fit in ``ALLREDUCE_RESIDENT_MAX_BYTES``, the segment holds them
whole, a worker computes its slots' gradients straight into their rows
(:meth:`AllReduce.resident_views`) and reads the sum where it was made
(:meth:`AllReduce.reduce_resident`): no copy in, no copy out. Such a segment
can hold more rows that every rank of the node shares
(:meth:`AllReduce.shared_views`): one copy of the parameters and the optimizer
state, of which each rank updates a part.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from core.backend import array_module
from core.layers.base import GroupTree
from workers.config import (
    ALLREDUCE_BUCKET_BYTES,
    ALLREDUCE_RESIDENT_MAX_BYTES,
    ALLREDUCE_SHM_SHARE,
    ALLREDUCE_TIMEOUT_S,
    BARRIER_MAX_SLEEP_S,
)
from workers.errors import (
    AllReduceTimeoutError,
    BackendUnavailableError,
    SharedMemoryTooSmallError,
)

BACKENDS = ("ray", "gloo", "nccl")
_CACHE_LINE_BYTES = 64
#: Elements summed at a time: the running sum of a block stays in cache over all slots.
_SUM_BLOCK_ELEMENTS = 1 << 15


# --- the contract ---------------------------------------------------------------------


def owned_slots(rank: int, world_size: int, num_slots: int) -> range:
    """The slots rank ``rank`` contributes: a contiguous run of about
    ``num_slots / world_size`` (none for a rank past ``num_slots``)."""
    return range(rank * num_slots // world_size, (rank + 1) * num_slots // world_size)


Span = tuple[int, int]


def tree_cover(slots: Iterable[int], num_slots: int) -> list[Span]:
    """The fewest subtrees of the summation tree over ``num_slots`` slots whose slots
    are exactly ``slots``, in order, each as ``(first, past_last)``. A run owned by one
    of a power-of-two number of ranks (or nodes) is one subtree."""
    held = set(slots)
    cover: list[Span] = []

    def visit(a: int, b: int) -> None:
        inside = sum(1 for s in range(a, b) if s in held)
        if inside == b - a:
            cover.append((a, b))
        elif inside:
            mid = (a + b) // 2
            visit(a, mid)
            visit(mid, b)

    if num_slots:
        visit(0, num_slots)
    return cover


def span_tree(span: Span, first: int = 0) -> GroupTree:
    """The summation tree of subtree ``span`` as nested pairs of slots, each slot
    numbered from ``first`` (``slot - first``): what a rank that adds up its own slots
    before the all-reduce (:meth:`AllReduce.presum_spans`) adds, in this order."""
    a, b = span
    if b - a == 1:
        return a - first
    mid = (a + b) // 2
    return (span_tree((a, mid), first), span_tree((mid, b), first))


def tree_sum(parts: Mapping[Span, Any], num_slots: int, out: Any) -> Any:
    """``out`` = the sum over slots ``0..num_slots-1`` along the tree, where ``parts``
    gives the sums of some subtrees (a slot's own row is the subtree ``(s, s + 1)``)
    and every slot lies under exactly one of them.

    Never ``rows.sum(axis=0)``: NumPy sums an axis in an order that depends on the
    number of rows.
    """
    return _subtree_sum(parts, (0, num_slots), out)


def _subtree_sum(parts: Mapping[Span, Any], root: Span, out: Any) -> Any:
    """``out`` = the sum over subtree ``root`` (see :func:`tree_sum`)."""
    return _run_plan(_plan(tuple(parts), root), list(parts.values()), out)


@functools.lru_cache(maxsize=64)
def _covers(party_of_rank: tuple[int, ...], num_slots: int) -> tuple[tuple[Span, ...], ...]:
    """The :func:`tree_cover` of each party's slots, where ``party_of_rank[r]`` is the
    party (a rank itself, or its node) that rank ``r``'s slots go with."""
    world_size = len(party_of_rank)
    return tuple(
        tuple(
            tree_cover(
                (
                    s
                    for r, owner in enumerate(party_of_rank)
                    if owner == party
                    for s in owned_slots(r, world_size, num_slots)
                ),
                num_slots,
            )
        )
        for party in range(max(party_of_rank) + 1)
    )


def ordered_sum(rows: Sequence[Any] | np.ndarray, out: Any) -> Any:
    """``out`` = the rows of ``len(rows)`` slots summed along the tree."""
    return tree_sum(_leaves(rows), len(rows), out)


def _leaves(rows: Sequence[Any] | np.ndarray, first: int = 0) -> dict[Span, Any]:
    return {(first + k, first + k + 1): row for k, row in enumerate(rows)}


def _given(covers: Sequence[Sequence[Span]], blocks: Sequence[Any]) -> dict[Span, Any]:
    """The subtree sums each party sent: ``blocks[k][i]`` is the sum of ``covers[k][i]``
    (rows past a party's cover are padding)."""
    return {
        span: block[i]
        for cover, block in zip(covers, blocks, strict=True)
        for i, span in enumerate(cover)
    }


@dataclass(frozen=True)
class _Plan:
    """The additions that sum subtree ``root`` from the given subtrees. Registers:
    the given sums (0..P-1), then ``out`` (P), then scratch; each step is
    ``add(left, right, out=dest)``; ``result`` holds the sum at the end."""

    steps: tuple[tuple[int, int, int], ...]
    given: int
    scratch: int
    result: int


@functools.lru_cache(maxsize=256)
def _plan(spans: tuple[Span, ...], root: Span) -> _Plan:
    index = {span: i for i, span in enumerate(spans)}
    given = len(spans)
    steps: list[tuple[int, int, int]] = []
    scratch: dict[tuple[int, int], int] = {}

    def value(a: int, b: int, depth: int, side: int) -> int:
        if (a, b) in index:
            return index[a, b]
        if b - a <= 1:
            raise KeyError(f"no sum given for slot {a}")
        mid = (a + b) // 2
        left = value(a, mid, depth + 1, 0)
        right = value(mid, b, depth + 1, 1)
        # Two scratch registers per depth: a node's children are done before its
        # sibling starts, so the sibling may reuse the depth below.
        dest = given if depth == 0 else scratch.setdefault((depth, side), given + 1 + len(scratch))
        steps.append((left, right, dest))
        return dest

    result = value(*root, 0, 0)
    return _Plan(tuple(steps), given, len(scratch), result)


def _run_plan(plan: _Plan, given: list[Any], out: Any, scratch: list[Any] | None = None) -> Any:
    xp = array_module(out)
    if scratch is None:
        scratch = [xp.empty_like(out) for _ in range(plan.scratch)]
    registers = [*given, out, *scratch]
    for left, right, dest in plan.steps:
        xp.add(registers[left], registers[right], out=registers[dest])
    if plan.result != plan.given:
        out[...] = registers[plan.result]
    return out


def chunk_bounds(length: int, parts: int) -> list[int]:
    """``parts + 1`` boundaries cutting ``range(length)`` into near-equal chunks (some may be
    empty when ``parts > length``)."""
    return [(i * length) // parts for i in range(parts + 1)]


@dataclass(frozen=True)
class Topology:
    """Which node each rank runs on, as small integers in order of first appearance."""

    node_of_rank: tuple[int, ...]

    @classmethod
    def from_node_ids(cls, node_ids: Sequence[str]) -> Topology:
        index: dict[str, int] = {}
        for node_id in node_ids:
            index.setdefault(node_id, len(index))
        return cls(tuple(index[node_id] for node_id in node_ids))

    @property
    def world_size(self) -> int:
        return len(self.node_of_rank)

    @property
    def num_nodes(self) -> int:
        return max(self.node_of_rank) + 1

    def local_ranks(self, node: int) -> list[int]:
        return [r for r, n in enumerate(self.node_of_rank) if n == node]

    def leader(self, node: int) -> int:
        return self.local_ranks(node)[0]

    def is_leader(self, rank: int) -> bool:
        return self.leader(self.node_of_rank[rank]) == rank


class AllReduce:
    """One rank's end of an all-reduce; subclasses reduce one bucket."""

    name: ClassVar[str]
    #: The array module of the buffers this backend takes (NumPy, or CuPy for NCCL).
    xp: ModuleType = np

    def __init__(self, *, rank: int, world_size: int, bucket_elements: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.bucket_elements = max(int(bucket_elements), 1)

    def reduce(self, rows: Any, num_slots: int, out: Any, *, ordered: bool = True) -> None:
        """Sum the slot rows of every rank into ``out`` on every rank.

        rows: (len(owned_slots(rank, world_size, num_slots)), n), this rank's slots in
        increasing order; out: (n,). With ``ordered=False`` a backend may use its own
        order of summation (faster, but the bits then depend on the number of workers).
        """
        n = out.shape[0]
        expected = len(owned_slots(self.rank, self.world_size, num_slots))
        if rows.shape != (expected, n):
            raise ValueError(f"rank {self.rank} owns {expected} rows of {n}, got {rows.shape}")
        for start in range(0, n, self.bucket_elements):
            stop = min(start + self.bucket_elements, n)
            self._reduce_bucket(rows[:, start:stop], num_slots, out[start:stop], ordered)

    def _reduce_bucket(self, rows: Any, num_slots: int, out: Any, ordered: bool) -> None:
        raise NotImplementedError

    def resident_views(self) -> tuple[list[Any], Any] | None:
        """This rank's slot rows and the result row, where the backend keeps whole rows.

        A caller that writes its slots' rows in place calls :meth:`reduce_resident`
        instead of :meth:`reduce`, then reads the sum from the result row (until its
        next call). None when the backend copies rows in and out.
        """
        return None

    def reduce_resident(
        self, num_slots: int, *, ordered: bool = True, presummed: bool = False
    ) -> bool:
        """Sum the resident slot rows into the result row along the tree (unless
        ``ordered=False``, as in :meth:`reduce`); returns whether every element of the
        sum is finite. ``presummed``: every rank wrote, in the row of the first slot of
        each span of its :meth:`presum_spans`, the sum of that subtree, not the slots'
        own rows (the others are not read)."""
        raise NotImplementedError

    def presum_spans(self, num_slots: int) -> list[Span] | None:
        """The subtrees this rank may add up itself before a resident reduce (see
        :meth:`reduce_resident`): its slots' :func:`tree_cover`. None where the backend
        takes only slot rows."""
        return None

    def shared_views(self) -> SharedRows | None:
        """The rows shared by the ranks of this rank's node (asked for at creation);
        None when the backend has no such rows."""
        return None

    # Setup runs in three phases, each on every rank before the next (see make_allreduce).
    def attach(self) -> None:
        """Second phase: join what the first phase created elsewhere."""

    def seal(self) -> None:
        """Third phase: every rank has joined."""

    def close(self) -> None:
        """Release what the backend holds (idempotent)."""


@dataclass(frozen=True)
class SharedRows:
    """Rows every rank of one node reads and writes, and how to meet the others."""

    rows: list[np.ndarray]
    #: This rank among the node's ranks, and how many there are.
    local_index: int
    local_size: int
    #: Waits until every rank of the node has called it as often (a barrier).
    wait: Callable[[], None]

    def part(self, length: int) -> slice:
        """This rank's share of ``range(length)``."""
        bounds = chunk_bounds(length, self.local_size)
        return slice(bounds[self.local_index], bounds[self.local_index + 1])


@dataclass(frozen=True)
class AllReduceSetup:
    """How a group's ranks reduce; the same on every rank."""

    backend: str
    #: The Ray node of each rank, in rank order.
    node_ids: tuple[str, ...]
    #: Unique per group: names its shared-memory segments or its collective group.
    name: str
    num_slots: int
    bucket_bytes: int = ALLREDUCE_BUCKET_BYTES
    timeout_s: float = ALLREDUCE_TIMEOUT_S
    #: Shared memory keeps whole rows when all of them take no more than this.
    resident_max_bytes: int = ALLREDUCE_RESIDENT_MAX_BYTES
    #: How the ``ray`` backend's node leaders talk: ``gloo`` or ``ray`` (the object
    #: store); None picks gloo where it is installed.
    leader_link: str | None = None
    #: The least free ``/dev/shm``, in bytes, on a node with several ranks (None: not
    #: known, or no such node). A node's segment takes at most ``ALLREDUCE_SHM_SHARE``
    #: of it: a segment larger than the space left would kill its workers (SIGBUS)
    #: when they write past it.
    shm_free_bytes: int | None = None

    @property
    def world_size(self) -> int:
        return len(self.node_ids)

    @property
    def needs_exchange(self) -> bool:
        """Whether the node leaders swap through a :class:`LeaderExchange` actor (a
        ``ray`` group on several nodes whose leaders do not talk over gloo)."""
        if self.backend != "ray" or Topology.from_node_ids(self.node_ids).num_nodes < 2:
            return False
        return self._leader_link() == "ray"

    def _leader_link(self) -> str:
        return self.leader_link or ("gloo" if backend_unavailable_reason("gloo") is None else "ray")


def make_allreduce(
    setup: AllReduceSetup,
    *,
    rank: int,
    vector_size: int,
    dtype: Any,
    exchange: Any = None,
    shared_rows: int = 0,
) -> AllReduce:
    """The first setup phase of rank ``rank``: build its end of the all-reduce.

    Then, on every rank in turn, :meth:`AllReduce.attach` and :meth:`AllReduce.seal`.
    ``exchange`` is the :class:`LeaderExchange` actor of a ``ray`` group on several nodes.
    ``shared_rows`` asks for that many rows shared by each node's ranks, where rows are
    resident (see :meth:`AllReduce.shared_views`).
    """
    bucket_elements = bucket_elements_for(dtype, setup.bucket_bytes)
    if setup.backend == "ray":
        resident, segment_bucket = segment_plan(
            setup,
            vector_size=vector_size,
            itemsize=np.dtype(dtype).itemsize,
            shared_rows=shared_rows,
        )
        leader_link = setup._leader_link()
        backend = SharedMemoryAllReduce(
            rank=rank,
            topology=Topology.from_node_ids(setup.node_ids),
            segment_prefix=setup.name,
            num_slots=setup.num_slots,
            vector_size=vector_size,
            dtype=dtype,
            bucket_elements=segment_bucket,
            exchange=exchange,
            timeout_s=setup.timeout_s,
            resident=resident,
            shared_rows=shared_rows if resident else 0,
            leader_link=leader_link,
            leader_piece=bucket_elements,
        )
        backend.create()
        return backend
    if setup.backend in ("gloo", "nccl"):
        return CollectiveAllReduce(
            backend=setup.backend,
            rank=rank,
            world_size=setup.world_size,
            group_name=setup.name,
            dtype=dtype,
            bucket_elements=bucket_elements,
            timeout_s=setup.timeout_s,
        )
    raise BackendUnavailableError(backend_unavailable_reason(setup.backend) or setup.backend)


#: Fewest elements in a bucket of the ``ray`` backend's segment.
MIN_SEGMENT_BUCKET_ELEMENTS = 1 << 14


def segment_plan(
    setup: AllReduceSetup, *, vector_size: int, itemsize: int, shared_rows: int
) -> tuple[bool, int]:
    """Whether the ``ray`` backend's segment holds whole rows (resident), and its bucket in
    elements: the same on every rank, as it depends on ``setup`` and sizes alone.

    Rows are resident when the slot rows, the result and the shared rows fit
    ``resident_max_bytes``, and the segment (:class:`SharedMemoryLayout`, on the
    node with the most ranks) fits the share of ``/dev/shm`` allowed; otherwise
    buckets are ``bucket_bytes`` or smaller, so that the segment fits that share.
    Raises :class:`SharedMemoryTooSmallError` when not even small buckets fit.
    """
    topology = Topology.from_node_ids(setup.node_ids)
    local_size = max(len(topology.local_ranks(node)) for node in range(topology.num_nodes))

    def layout(bucket: int, resident: bool) -> SharedMemoryLayout:
        return SharedMemoryLayout(
            local_size=local_size,
            num_slots=setup.num_slots,
            bucket_elements=bucket,
            itemsize=itemsize,
            halves=1 if resident else 2,
            shared_rows=shared_rows if resident else 0,
        )

    free = setup.shm_free_bytes
    allowed = None if free is None else int(free * ALLREDUCE_SHM_SHARE)
    rows_bytes = (setup.num_slots + 1 + shared_rows) * vector_size * itemsize
    if rows_bytes <= setup.resident_max_bytes and (
        allowed is None or layout(vector_size, True).size <= allowed
    ):
        return True, vector_size
    bucket = min(max(setup.bucket_bytes // itemsize, 1), max(vector_size, 1))
    if free is None or allowed is None:
        return False, bucket
    # Past its counters, a segment grows in proportion to its bucket.
    unit = layout(1, False)
    counters = 2 * unit.counters_bytes
    fits = (allowed - counters) // (unit.size - counters)
    least = min(MIN_SEGMENT_BUCKET_ELEMENTS, max(vector_size, 1))
    if fits < least:
        need = layout(least, False).size / ALLREDUCE_SHM_SHARE
        raise SharedMemoryTooSmallError(
            f"/dev/shm has {free / 2**20:.1f} MiB free on a node with "
            f"several workers; the ray all-reduce needs {need / 2**20:.1f} MiB free "
            "there: give the node more shared memory (docker --shm-size), "
            "run one worker per node, or use the gloo backend"
        )
    return False, min(bucket, fits)


def bucket_elements_for(dtype: Any, bucket_bytes: int = ALLREDUCE_BUCKET_BYTES) -> int:
    return max(bucket_bytes // np.dtype(dtype).itemsize, 1)


def backend_unavailable_reason(name: str, *, check_devices: bool = True) -> str | None:
    """Why backend ``name`` cannot run in this process, or None when it can.

    ``check_devices=False`` checks only the software (for a driver without GPUs).
    """
    if name == "ray":
        return None
    if name == "gloo":
        try:
            import torch.distributed as dist
        except ImportError:
            return "the gloo backend needs torch: pip install 'trainq[gloo]'"
        if not dist.is_available():
            return "this torch build has no torch.distributed"
        from ray.util.collective import collective

        if not collective.gloo_available():
            return "ray.util.collective has no gloo backend here"
        return None
    if name == "nccl":
        try:
            import cupy
            import torch  # noqa: F401  (Ray's NCCL group imports it)
        except ImportError:
            return "the nccl backend needs CuPy and torch on a machine with CUDA"
        try:
            if check_devices and cupy.cuda.runtime.getDeviceCount() < 1:
                return "no CUDA device"
        except Exception as exc:  # CUDA driver missing or broken
            return f"no usable CUDA device: {exc}"
        from ray.util.collective import collective

        if not collective.nccl_available():
            return "ray.util.collective has no NCCL backend here"
        return None
    return f"unknown all-reduce backend {name!r}; expected one of {BACKENDS}"


# --- "ray": shared memory on a node, Ray's object store between nodes -----------------


class SharedMemoryBarrier:
    """A reusable barrier for the ranks of one node, in a shared-memory segment.

    Each local rank owns one counter that only it writes (so no atomic
    read-modify-write is needed): arriving at barrier ``g`` sets it to ``g``,
    and a rank passes once every counter has reached ``g``. Waiting sleeps
    with exponential backoff, so waiters do not burn the CPU their peers need.
    """

    def __init__(self, counters: np.ndarray, local_index: int, timeout_s: float) -> None:
        self._counters = counters
        self._index = local_index
        self._timeout_s = timeout_s
        self._generation = int(counters[local_index])

    def wait(self) -> None:
        self._generation += 1
        generation = self._generation
        counters = self._counters
        counters[self._index] = generation
        if counters.min() >= generation:
            return
        deadline = time.monotonic() + self._timeout_s
        pause = 1e-5
        while counters.min() < generation:
            if time.monotonic() > deadline:
                late = [i for i, c in enumerate(counters.tolist()) if c < generation]
                raise AllReduceTimeoutError(
                    f"local ranks {late} did not reach the all-reduce barrier "
                    f"within {self._timeout_s:g} s"
                )
            time.sleep(pause)
            pause = min(pause * 2, BARRIER_MAX_SLEEP_S)


@dataclass(frozen=True)
class SharedMemoryLayout:
    """Where things live in a node's segment: barrier counters, finite flags, then
    two sets of (slot rows, result) used by alternate buckets, so that a fast rank
    writing the next bucket never overwrites what a slow rank still reads. Resident
    rows need one set: a rank writes its rows again only after every rank has
    finished reading the last result (they all pass the next barrier first)."""

    local_size: int
    num_slots: int
    bucket_elements: int
    itemsize: int
    halves: int = 2
    #: Rows of ``bucket_elements`` after the halves, shared by the node's ranks.
    shared_rows: int = 0

    @property
    def counters_bytes(self) -> int:
        raw = self.local_size * 8
        return -(-raw // _CACHE_LINE_BYTES) * _CACHE_LINE_BYTES

    @property
    def half_bytes(self) -> int:
        return (self.num_slots + 1) * self.bucket_elements * self.itemsize

    @property
    def size(self) -> int:
        return self.shared_offset + self.shared_rows * self.bucket_elements * self.itemsize

    @property
    def shared_offset(self) -> int:
        return 2 * self.counters_bytes + self.halves * self.half_bytes


class SharedMemoryAllReduce(AllReduce):
    """The ``ray`` backend (see the module docstring).

    Set up in three phases, each on every rank of the group before the next:
    :meth:`create` (leaders make their node's segment), :meth:`attach` (the
    others map it), :meth:`seal` (leaders unlink its name, so the memory goes
    away with the last process that maps it, even one killed by SIGKILL).
    """

    name = "ray"

    def __init__(
        self,
        *,
        rank: int,
        topology: Topology,
        segment_prefix: str,
        num_slots: int,
        vector_size: int,
        dtype: Any,
        bucket_elements: int,
        exchange: Any = None,
        timeout_s: float = ALLREDUCE_TIMEOUT_S,
        resident: bool = False,
        shared_rows: int = 0,
        leader_link: str = "ray",
        leader_piece: int = 0,
    ) -> None:
        super().__init__(
            rank=rank,
            world_size=topology.world_size,
            bucket_elements=min(bucket_elements, max(vector_size, 1)),
        )
        self.topology = topology
        self.node = topology.node_of_rank[rank]
        self.local_ranks = topology.local_ranks(self.node)
        self.local_index = self.local_ranks.index(rank)
        self.is_leader = self.local_index == 0
        self.dtype = np.dtype(dtype)
        self.num_slots = num_slots
        self.timeout_s = timeout_s
        self.segment_name = f"{segment_prefix}-n{self.node}"
        self.vector_size = vector_size
        self.resident = resident and self.bucket_elements >= vector_size
        self.layout = SharedMemoryLayout(
            local_size=len(self.local_ranks),
            num_slots=num_slots,
            bucket_elements=self.bucket_elements,
            itemsize=self.dtype.itemsize,
            halves=1 if self.resident else 2,
            shared_rows=shared_rows if self.resident else 0,
        )
        if leader_link not in ("ray", "gloo"):
            raise ValueError(f"unknown leader link {leader_link!r}; expected 'ray' or 'gloo'")
        self.leader_link = leader_link if topology.num_nodes > 1 else "ray"
        #: Elements of each row that leaders reduce over gloo at a time (0: one bucket).
        self.leader_piece = max(int(leader_piece) or bucket_elements, 1)
        self._leader_group = f"{segment_prefix}-leaders"
        self._leader_group_open = False
        if topology.num_nodes > 1 and self.leader_link == "ray" and exchange is None:
            raise ValueError("a group on several nodes needs an exchange between node leaders")
        self._exchange = exchange
        self._shm: shared_memory.SharedMemory | None = None
        self._private: np.ndarray | None = None  # the segment of a rank alone on its node
        self._buckets = 0
        self._rounds = 0

    # --- setup ------------------------------------------------------------------------

    def create(self) -> None:
        """First phase: the leader of each node makes its node's segment (and, over
        gloo, joins the other leaders: every rank runs this phase at the same time).

        A rank alone on its node shares its segment with no one, so it keeps it in
        private memory: ``/dev/shm`` pages may not be huge pages, and the sums, the
        optimizer and gloo all run slower on them.
        """
        if self.is_leader:
            counters: Any
            if self.layout.local_size == 1:
                counters = self._private = np.empty(self.layout.size, np.uint8)
            else:
                self._shm = shared_memory.SharedMemory(
                    name=self.segment_name, create=True, size=self.layout.size
                )
                counters = self._shm.buf
            np.ndarray((self.layout.local_size,), np.int64, counters)[:] = 0
            if self.leader_link == "gloo":
                reason = backend_unavailable_reason("gloo")
                if reason is not None:
                    raise BackendUnavailableError(reason)
                from ray.util import collective
                from ray.util.collective.types import Backend

                collective.init_collective_group(
                    self.topology.num_nodes,
                    self.node,
                    backend=Backend("gloo"),
                    group_name=self._leader_group,
                    gloo_timeout=int(self.timeout_s * 1000),
                )
                self._leader_group_open = True

    def attach(self) -> None:
        if not self.is_leader:
            self._shm = shared_memory.SharedMemory(name=self.segment_name)
            # The leader owns the segment; without this, this process's resource
            # tracker would unlink it (and warn) when this process exits.
            resource_tracker.unregister("/" + self._shm.name, "shared_memory")
        self._map()

    def seal(self) -> None:
        if self.is_leader and self._shm is not None:
            self._shm.unlink()

    def _map(self) -> None:
        layout = self.layout
        buf: Any = self._private
        if buf is None:
            assert self._shm is not None
            buf = self._shm.buf
        counters = np.ndarray((layout.local_size,), np.int64, buf)
        self._barrier = SharedMemoryBarrier(counters, self.local_index, self.timeout_s)
        self._finite = np.ndarray((layout.local_size,), np.int64, buf, layout.counters_bytes)
        self._slots: list[np.ndarray] = []
        self._results: list[np.ndarray] = []
        for half in range(layout.halves):
            offset = 2 * layout.counters_bytes + half * layout.half_bytes
            block = np.ndarray(
                (layout.num_slots + 1, layout.bucket_elements), self.dtype, buf, offset
            )
            self._slots.append(block[:-1])
            self._results.append(block[-1])
        self._shared = np.ndarray(
            (layout.shared_rows, layout.bucket_elements), self.dtype, buf, layout.shared_offset
        )

    # --- reducing -----------------------------------------------------------------------

    def _reduce_bucket(self, rows: Any, num_slots: int, out: Any, ordered: bool) -> None:
        if num_slots > self.num_slots:
            raise ValueError(f"segment holds {self.num_slots} slots, asked for {num_slots}")
        n = out.shape[0]
        half = self._buckets % len(self._slots)
        self._buckets += 1
        slots, result = self._slots[half], self._results[half]
        for row, slot in zip(rows, owned_slots(self.rank, self.world_size, num_slots), strict=True):
            slots[slot, :n] = row
        self._barrier.wait()
        self._sum_segment(slots, result, num_slots, n, ordered)
        self._barrier.wait()
        out[...] = result[:n]

    def resident_views(self) -> tuple[list[Any], Any] | None:
        if not self.resident:
            return None
        n = self.vector_size
        slots, result = self._slots[0], self._results[0]
        mine = owned_slots(self.rank, self.world_size, self.num_slots)
        return [slots[slot, :n] for slot in mine], result[:n]

    def shared_views(self) -> SharedRows | None:
        if not self.layout.shared_rows:
            return None
        return SharedRows(
            rows=list(self._shared[:, : self.vector_size]),
            local_index=self.local_index,
            local_size=len(self.local_ranks),
            wait=self._barrier.wait,
        )

    def presum_spans(self, num_slots: int) -> list[Span] | None:
        """With resident rows: a rank that adds up its slots' gradients while they are
        in its cache (:meth:`core.model.Model.set_groups` with trees) writes one row
        per subtree instead of one per slot into its node's segment, and the sum over
        the segment (a leader's, across nodes) reads as few rows."""
        if not self.resident:
            return None
        return list(_covers(tuple(range(self.world_size)), num_slots)[self.rank])

    def reduce_resident(
        self, num_slots: int, *, ordered: bool = True, presummed: bool = False
    ) -> bool:
        if not self.resident:
            raise RuntimeError("this all-reduce copies rows; call reduce()")
        if num_slots > self.num_slots:
            raise ValueError(f"segment holds {self.num_slots} slots, asked for {num_slots}")
        if presummed and self.presum_spans(num_slots) is None:
            raise RuntimeError("this all-reduce takes slot rows only (see presum_spans)")
        self._barrier.wait()
        finite = self._sum_segment(
            self._slots[0], self._results[0], num_slots, self.vector_size, ordered, presummed
        )
        # Read only after the next barrier, and written again only after the one after it.
        self._finite[self.local_index] = finite
        self._barrier.wait()
        return bool(self._finite.min())

    def _sum_segment(
        self,
        slots: np.ndarray,
        result: np.ndarray,
        num_slots: int,
        n: int,
        ordered: bool,
        presummed: bool = False,
    ) -> bool:
        """This rank's part of the sum of the slot rows (on one node, one chunk of the
        elements; across nodes, the leader does it all); whether that part is finite.
        ``presummed``: the rows hold the ranks' subtree sums (see :meth:`presum_spans`)."""
        if self.topology.num_nodes == 1:
            bounds = chunk_bounds(n, len(self.local_ranks))
            lo, hi = bounds[self.local_index], bounds[self.local_index + 1]
            span = (0, num_slots)
            return self._span_sum(slots[:, lo:hi], span, result[lo:hi], num_slots, presummed)
        if self.is_leader:
            return self._reduce_across_nodes(slots, result, num_slots, n, ordered, presummed)
        return True

    def _span_sum(
        self, slots: np.ndarray, span: Span, out: np.ndarray, num_slots: int, presummed: bool
    ) -> bool:
        """``out`` = the sum of subtree ``span`` of the segment's rows (see
        :func:`_blocked_sum`): of the slots' own rows, or (``presummed``) of the subtree
        sums the ranks wrote in their spans' first rows; whether it is finite."""
        if not presummed:
            return _sum_span(slots, span, out)
        a, b = span
        covers = _covers(tuple(range(self.world_size)), num_slots)
        parts = {s: slots[s[0]] for cover in covers for s in cover if a <= s[0] and s[1] <= b}
        return _blocked_sum(parts, span, out)

    def _reduce_across_nodes(
        self,
        slots: np.ndarray,
        result: np.ndarray,
        num_slots: int,
        n: int,
        ordered: bool,
        presummed: bool,
    ) -> bool:
        """Leaders only: each sums its node's whole subtrees, then (over gloo) all gather
        those and finish the tree, or (through Ray) each finishes one chunk of the
        elements and all swap chunks; whether the sum is finite.

        Over gloo this goes ``leader_piece`` elements of the rows at a time, as gloo's
        own buckets do: a piece's partial sums, gloo's copies of it and the final sum
        then stay in cache, where whole rows of many megabytes would not.
        """
        if self.leader_link != "gloo":
            return self._swap_across_nodes(slots, result, num_slots, n, presummed)
        finite = True
        for lo in range(0, n, self.leader_piece):
            hi = min(lo + self.leader_piece, n)
            piece_finite = self._gloo_across_nodes(
                slots[:, lo:hi], result[lo:hi], num_slots, ordered, presummed
            )
            finite = finite and piece_finite
        return finite

    def _gloo_across_nodes(
        self,
        slots: np.ndarray,
        result: np.ndarray,
        num_slots: int,
        ordered: bool,
        presummed: bool,
    ) -> bool:
        """One piece of :meth:`_reduce_across_nodes` over gloo (``result`` is the piece)."""
        from ray.util import collective

        covers = _covers(self.topology.node_of_rank, num_slots)
        own = covers[self.node]
        m = result.shape[0]
        # Private memory for what leaves the node: gloo is several times slower on a
        # shared-memory mapping.
        partials = self._scratch_rows("partials", max(len(c) for c in covers), m)
        if not ordered:
            # Any order: gloo's own all-reduce of the node's sum, made in place where
            # the segment is private.
            total = result if self._private is not None else partials[0]
            if not own:
                total[...] = 0
            for k, span in enumerate(own):
                row = total if k == 0 else partials[k]
                self._span_sum(slots, span, row, num_slots, presummed)
                if k:
                    total += row
            collective.allreduce(total, group_name=self._leader_group)
            if self._private is None:
                result[...] = total
            return bool(np.isfinite(total).all())
        for row, span in zip(partials, own, strict=False):
            self._span_sum(slots, span, row, num_slots, presummed)
        received = [
            self._scratch_rows(f"received{k}", partials.shape[0], m)
            for k in range(self.topology.num_nodes)
        ]
        collective.allgather(received, partials, group_name=self._leader_group)
        return _blocked_sum(_given(covers, received), (0, num_slots), result)

    def _swap_across_nodes(
        self, slots: np.ndarray, result: np.ndarray, num_slots: int, n: int, presummed: bool
    ) -> bool:
        """:meth:`_reduce_across_nodes` through Ray's object store, in one piece (every
        swap is a round trip through an actor)."""
        nodes = self.topology.num_nodes
        covers = _covers(self.topology.node_of_rank, num_slots)
        own = covers[self.node]
        partials = self._scratch_rows("partials", max(len(c) for c in covers), n)
        for row, span in zip(partials, own, strict=False):
            self._span_sum(slots[:, :n], span, row, num_slots, presummed)
        bounds = chunk_bounds(n, nodes)
        mine = partials[: len(own)]
        outgoing = [np.ascontiguousarray(mine[:, bounds[k] : bounds[k + 1]]) for k in range(nodes)]
        incoming = self._swap(outgoing)
        lo, hi = bounds[self.node], bounds[self.node + 1]
        chunk = tree_sum(_given(covers, incoming), num_slots, np.empty(hi - lo, self.dtype))
        chunks = self._swap([chunk] * nodes)
        for node, block in enumerate(chunks):
            result[bounds[node] : bounds[node + 1]] = block
        return bool(np.isfinite(result[:n]).all())

    def _scratch_rows(self, name: str, rows: int, length: int) -> np.ndarray:
        """A private, contiguous ``(rows, length)`` work array, carved from one kept from
        call to call (no page faults) and grown when too small."""
        scratch = self.__dict__.setdefault("_scratch_arrays", {})
        array = scratch.get(name)
        if array is None or array.size < rows * length:
            array = scratch[name] = np.empty(rows * length, self.dtype)
        return array[: rows * length].reshape(rows, length)

    def _swap(self, outgoing: list[np.ndarray]) -> list[np.ndarray]:
        """Send ``outgoing[k]`` to the leader of node ``k``; receive one array from each."""
        import ray

        self._rounds += 1
        refs = [ray.put(block) for block in outgoing]
        # Refs inside a list travel as references; the receiver fetches the data.
        reply = self._exchange.swap.remote(self._rounds, self.node, [[ref] for ref in refs])
        try:
            incoming = ray.get(reply, timeout=self.timeout_s)
            return [ray.get(ref[0], timeout=self.timeout_s) for ref in incoming]
        except ray.exceptions.GetTimeoutError:
            raise AllReduceTimeoutError(
                f"node leaders did not exchange within {self.timeout_s:g} s"
            ) from None

    def close(self) -> None:
        if self._leader_group_open:
            from ray.util import collective

            self._leader_group_open = False
            collective.destroy_collective_group(self._leader_group)
        if self._shm is not None or self._private is not None:
            self._slots, self._results = [], []
            self._shared = np.empty((0, 0), self.dtype)
            self._barrier = None  # type: ignore[assignment]
            self._private = None
        if self._shm is not None:
            try:
                self._shm.close()
            except BufferError:  # a view is still alive somewhere; the process exit frees it
                pass
            self._shm = None


def _sum_span(slots: np.ndarray, span: Span, out: np.ndarray) -> bool:
    """``out`` = the sum of slot rows ``span[0]..span[1]-1``, a subtree (see
    :func:`_blocked_sum`); whether it is finite."""
    return _blocked_sum(_leaves(slots[span[0] : span[1]], span[0]), span, out)


def _blocked_sum(parts: Mapping[Span, Any], root: Span, out: np.ndarray) -> bool:
    """The sum of subtree ``root`` from ``parts`` (see :func:`tree_sum`), block by
    block so that the partial sums stay in cache; returns whether it is finite."""
    plan = _plan(tuple(parts), root)
    given = list(parts.values())
    scratch = [
        np.empty(min(_SUM_BLOCK_ELEMENTS, out.shape[0]), out.dtype) for _ in range(plan.scratch)
    ]
    finite = True
    for start in range(0, out.shape[0], _SUM_BLOCK_ELEMENTS):
        part = slice(start, start + _SUM_BLOCK_ELEMENTS)
        block = out[part]
        _run_plan(plan, [g[part] for g in given], block, [w[: block.shape[0]] for w in scratch])
        finite = finite and bool(np.isfinite(block).all())
    return finite


class LeaderExchange:
    """Mailbox through which node leaders swap object references, round by round.

    A plain class; the worker group runs it as an async Ray actor with no CPU.
    Leader ``k`` posts one reference for each leader; it gets back, in node
    order, the references every leader posted for it.
    """

    def __init__(self, num_nodes: int) -> None:
        self.num_nodes = num_nodes
        self._posted: dict[int, dict[int, list[Any]]] = {}
        self._complete: dict[int, asyncio.Event] = {}
        self._collected: dict[int, int] = {}

    async def swap(self, round_id: int, node: int, outgoing: list[Any]) -> list[Any]:
        posted = self._posted.setdefault(round_id, {})
        complete = self._complete.setdefault(round_id, asyncio.Event())
        posted[node] = outgoing
        if len(posted) == self.num_nodes:
            complete.set()
        await complete.wait()
        incoming = [posted[sender][node] for sender in range(self.num_nodes)]
        self._collected[round_id] = self._collected.get(round_id, 0) + 1
        if self._collected[round_id] == self.num_nodes:
            del self._posted[round_id], self._complete[round_id], self._collected[round_id]
        return incoming


# --- gloo and NCCL through ray.util.collective --------------------------------------------


class CollectiveAllReduce(AllReduce):
    """``gloo`` or ``nccl`` through ``ray.util.collective`` (every rank joins at setup)."""

    def __init__(
        self,
        *,
        backend: str,
        rank: int,
        world_size: int,
        group_name: str,
        dtype: Any,
        bucket_elements: int,
        timeout_s: float = ALLREDUCE_TIMEOUT_S,
    ) -> None:
        super().__init__(rank=rank, world_size=world_size, bucket_elements=bucket_elements)
        reason = backend_unavailable_reason(backend)
        if reason is not None:
            raise BackendUnavailableError(reason)
        from ray.util import collective
        from ray.util.collective.types import Backend

        self.name = backend  # type: ignore[misc]
        self.group_name = group_name
        self.dtype = np.dtype(dtype)
        self._collective = collective
        if backend == "nccl":
            import cupy

            self.xp = cupy
        collective.init_collective_group(
            world_size,
            rank,
            backend=Backend(backend),
            group_name=group_name,
            gloo_timeout=int(timeout_s * 1000),
        )
        self._open = True

    def _reduce_bucket(self, rows: Any, num_slots: int, out: Any, ordered: bool) -> None:
        xp, collective = self.xp, self._collective
        if not ordered and num_slots == self.world_size:
            buffer = xp.ascontiguousarray(rows[0]).copy()
            collective.allreduce(buffer, group_name=self.group_name)
            out[...] = buffer
            return
        covers = _covers(tuple(range(self.world_size)), num_slots)
        mine = owned_slots(self.rank, self.world_size, num_slots)
        n = out.shape[0]
        send = xp.zeros((max(len(c) for c in covers), n), self.dtype)
        for row, span in zip(send, covers[self.rank], strict=False):
            local = rows[span[0] - mine.start : span[1] - mine.start]
            _subtree_sum(_leaves(local, span[0]), span, row)
        received = [xp.empty_like(send) for _ in range(self.world_size)]
        collective.allgather(received, send, group_name=self.group_name)
        tree_sum(_given(covers, received), num_slots, out)

    def close(self) -> None:
        if self._open:
            self._open = False
            self._collective.destroy_collective_group(self.group_name)
