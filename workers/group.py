"""A group of worker actors in one placement group, started and stopped as a unit.

``WorkerGroup.start`` reserves one bundle per worker, creates an actor of a
plain class in each (``ray.remote`` is applied here, not on the class), and
waits until every actor answers, giving up when its caller asks it to stop.
Anything that fails on the way tears down what was created and raises a typed
error. Once running, calls go to every worker at once; a worker process that
dies surfaces as :class:`WorkerFailedError` naming its rank.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from workers.allreduce import AllReduceSetup, LeaderExchange, Topology
from workers.config import WORKER_STARTUP_TIMEOUT_S
from workers.errors import (
    AllReduceTimeoutError,
    WorkerFailedError,
    WorkerGroupStartupError,
    WorkerGroupStartupTimeoutError,
)
from workers.worker import TrainWorker, WorkerInfo

PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
_POLL_S = 0.1


@dataclass(frozen=True)
class WorkerStatus:
    rank: int
    pid: int
    node_id: str
    actor_name: str
    alive: bool


@dataclass(frozen=True)
class WorkerGroupStatus:
    """A snapshot the driver polls; it never changes after it is taken."""

    name: str
    workers: tuple[WorkerStatus, ...]

    @property
    def num_nodes(self) -> int:
        return len({w.node_id for w in self.workers})

    @property
    def all_alive(self) -> bool:
        return all(w.alive for w in self.workers)


class WorkerGroup:
    """Running actors of one class, ranks ``0 .. num_workers - 1``."""

    def __init__(
        self,
        *,
        name: str,
        actors: list[Any],
        actor_names: list[str],
        infos: list[WorkerInfo],
        placement: PlacementGroup,
    ) -> None:
        self.name = name
        self.actors = actors
        self.actor_names = actor_names
        self.infos = infos
        self._placement: PlacementGroup | None = placement
        self._helpers: list[Any] = []

    # --- starting ---------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        num_workers: int,
        *,
        worker_cls: type = TrainWorker,
        num_cpus_per_worker: float = 1.0,
        num_gpus_per_worker: float = 0.0,
        resources_per_worker: Mapping[str, float] | Sequence[Mapping[str, float]] | None = None,
        placement_strategy: PlacementStrategy = "PACK",
        startup_timeout_s: float = WORKER_STARTUP_TIMEOUT_S,
        should_stop: Callable[[], bool] | None = None,
    ) -> WorkerGroup:
        """Reserve, create and start ``num_workers`` actors of ``worker_cls``.

        ``worker_cls(rank, world_size)`` is built in each bundle. A bundle holds
        ``num_cpus_per_worker`` CPUs, ``num_gpus_per_worker`` GPUs and any custom
        resources (one mapping for all, or one per rank, to pin ranks to nodes).
        Raises :class:`WorkerGroupStartupTimeoutError` when the resources or the
        actors are not ready within ``startup_timeout_s``, and
        :class:`WorkerGroupStartupError` when an actor fails to start.
        ``should_stop`` is asked every ``0.1`` s while it waits (as in :meth:`gather`);
        when it answers true the start ends with :class:`StopRequested`. Whatever
        ends a start before the group runs releases its actors and its placement group.
        """
        if num_workers < 1:
            raise ValueError("a worker group needs at least one worker")
        bundles = _bundles(
            num_workers, num_cpus_per_worker, num_gpus_per_worker, resources_per_worker
        )
        name = f"trainq-{uuid.uuid4().hex[:12]}"
        deadline = time.monotonic() + startup_timeout_s
        placement = placement_group(bundles, strategy=placement_strategy, name=name)
        actors: list[Any] = []
        try:
            if not _wait_for([placement.ready()], deadline, should_stop):
                raise WorkerGroupStartupTimeoutError(
                    _unplaceable(num_workers, bundles, placement_strategy, startup_timeout_s)
                )
            remote_cls: Any = ray.remote(worker_cls)
            actor_names = [f"{name}-rank{rank}" for rank in range(num_workers)]
            for rank, bundle in enumerate(bundles):
                actors.append(
                    remote_cls.options(
                        name=actor_names[rank],
                        num_cpus=bundle.get("CPU", 0),
                        num_gpus=bundle.get("GPU", 0),
                        resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
                        max_restarts=0,
                        scheduling_strategy=PlacementGroupSchedulingStrategy(
                            placement_group=placement, placement_group_bundle_index=rank
                        ),
                    ).remote(rank, num_workers)
                )
            refs = [actor.info.remote() for actor in actors]
            try:
                if not _wait_for(refs, deadline, should_stop):
                    raise WorkerGroupStartupTimeoutError(
                        f"{num_workers} workers did not start within {startup_timeout_s:g} s"
                    )
                infos = ray.get(refs)
            except RayActorError as exc:
                raise WorkerGroupStartupError(f"a worker failed to start: {exc}") from exc
        except BaseException:
            _release(actors, placement)
            raise
        return cls(
            name=name, actors=actors, actor_names=actor_names, infos=infos, placement=placement
        )

    # --- running --------------------------------------------------------------------------------

    @property
    def num_workers(self) -> int:
        return len(self.actors)

    @property
    def topology(self) -> Topology:
        return Topology.from_node_ids([info.node_id for info in self.infos])

    def execute(
        self,
        method: str,
        *args: Any,
        should_stop: Callable[[], bool] | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """Call ``method`` on every worker; the results in rank order."""
        return self.gather(self.submit(method, *args, **kwargs), should_stop=should_stop)

    def submit(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call ``method`` on every worker without waiting: one reference per rank, for
        :meth:`gather`. Each worker runs its calls in the order they were made."""
        return [getattr(actor, method).remote(*args, **kwargs) for actor in self.actors]

    def execute_on(self, rank: int, method: str, *args: Any, **kwargs: Any) -> Any:
        ref = getattr(self.actors[rank], method).remote(*args, **kwargs)
        return self.gather([ref], ranks=[rank])[0]

    def gather(
        self,
        refs: list[Any],
        *,
        ranks: list[int] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[Any]:
        """Wait for ``refs`` (one per rank, or per ``ranks``), failing on the first dead worker.

        ``should_stop`` is asked every ``0.1`` s while waiting; when it answers
        true the wait ends with :class:`StopRequested` (the calls keep running
        until the caller shuts the group down).
        """
        ranks = list(range(len(refs))) if ranks is None else ranks
        rank_of = {ref: rank for ref, rank in zip(refs, ranks, strict=True)}
        results: dict[Any, Any] = {}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=_POLL_S)
            for ref in ready:
                try:
                    results[ref] = ray.get(ref)
                except RayActorError as exc:
                    raise WorkerFailedError(
                        f"worker {rank_of[ref]} of {self.name} died: {exc.error_msg}",
                        rank=rank_of[ref],
                    ) from exc
                except AllReduceTimeoutError as exc:
                    raise WorkerFailedError(
                        f"worker {rank_of[ref]} of {self.name} timed out in the all-reduce: {exc}",
                        rank=rank_of[ref],
                    ) from exc
            if pending and not ready and should_stop is not None and should_stop():
                raise StopRequested
        return [results[ref] for ref in refs]

    def setup_allreduce(self, backend: str, *, num_slots: int, **options: Any) -> None:
        """Join every worker to one all-reduce (after each has set up its job)."""
        options.setdefault("shm_free_bytes", self.shm_free_bytes())
        setup = AllReduceSetup(
            backend=backend,
            node_ids=tuple(info.node_id for info in self.infos),
            name=self.name,
            num_slots=num_slots,
            **options,
        )
        self.join_allreduce(setup)

    def join_allreduce(self, setup: AllReduceSetup, **worker_options: Any) -> None:
        """Run the three set-up phases of ``setup`` (see :func:`make_allreduce`) on every
        worker, each phase everywhere before the next, with the node leaders' exchange
        where ``setup`` needs one; ``worker_options`` go to each worker's
        ``setup_allreduce``. A group may join several all-reduces of different names."""
        exchange = None
        if setup.needs_exchange:
            exchange = (
                ray.remote(LeaderExchange)
                .options(num_cpus=0, name=f"{setup.name}-exchange", max_restarts=0)
                .remote(Topology.from_node_ids(setup.node_ids).num_nodes)
            )
            self._helpers.append(exchange)
        for phase in ("create", "attach", "seal"):
            self.execute("setup_allreduce", setup, phase, exchange, **worker_options)

    def shm_free_bytes(self) -> int | None:
        """The least free ``/dev/shm`` seen at start on a node that holds several ranks,
        where the ``ray`` all-reduce puts its segment (None: no such node, or not known)."""
        ranks_on = Counter(info.node_id for info in self.infos)
        free = [
            info.shm_free_bytes
            for info in self.infos
            if ranks_on[info.node_id] > 1 and info.shm_free_bytes is not None
        ]
        return min(free) if free else None

    def poll_status(self, timeout_s: float = 5.0) -> WorkerGroupStatus:
        """Which workers answer a ping within ``timeout_s``."""
        refs = [actor.ping.remote() for actor in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        alive = []
        for ref in refs:
            try:
                alive.append(ref in ready and ray.get(ref) > 0)
            except RayActorError:
                alive.append(False)
        return self._snapshot(alive)

    def status(self) -> WorkerGroupStatus:
        """Where each rank runs, without calling the workers; ``alive`` is false once the
        group is shut down (:meth:`poll_status` asks the workers themselves)."""
        return self._snapshot([self._placement is not None] * len(self.infos))

    def _snapshot(self, alive: Sequence[bool]) -> WorkerGroupStatus:
        return WorkerGroupStatus(
            name=self.name,
            workers=tuple(
                WorkerStatus(
                    rank=info.rank,
                    pid=info.pid,
                    node_id=info.node_id,
                    actor_name=self.actor_names[info.rank],
                    alive=is_alive,
                )
                for info, is_alive in zip(self.infos, alive, strict=True)
            ),
        )

    # --- stopping ----------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Kill every actor and release the placement group (idempotent)."""
        _release([*self.actors, *self._helpers], self._placement)
        self._helpers = []
        self._placement = None

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _wait_for(refs: list[Any], deadline: float, should_stop: Callable[[], bool] | None) -> bool:
    """Wait until every one of ``refs`` is ready; False when ``deadline`` (monotonic)
    comes first. Raises what a ready one holds (an actor that failed to start) at once,
    and :class:`StopRequested` when ``should_stop``, asked every ``0.1`` s, answers true."""
    pending = list(refs)
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        ready, pending = ray.wait(
            pending, num_returns=len(pending), timeout=min(_POLL_S, remaining)
        )
        ray.get(ready)
        if pending and should_stop is not None and should_stop():
            raise StopRequested
    return True


def _unplaceable(
    num_workers: int, bundles: list[dict[str, float]], strategy: str, timeout_s: float
) -> str:
    """Why a placement group was not ready in time: what it asked for, what the cluster has."""
    if all(bundle == bundles[0] for bundle in bundles):
        wanted = f"{num_workers} workers with {_amounts(bundles[0])} each"
    else:
        total: Counter[str] = Counter()
        for bundle in bundles:
            total.update(bundle)
        wanted = f"{num_workers} workers with {_amounts(total)} in all"
    message = f"{wanted} ({strategy}) could not be placed within {timeout_s:g} s"
    try:
        have, free = ray.cluster_resources(), ray.available_resources()
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    except Exception:  # the cluster is going away: say what is known
        return message
    kinds = ["CPU", "GPU", *sorted({k for b in bundles for k in b} - {"CPU", "GPU"})]
    parts = [
        f"{_amount(kind, have.get(kind, 0.0))} ({free.get(kind, 0.0):g} free)"
        if have.get(kind)
        else _amount(kind, 0.0)
        for kind in kinds
    ]
    return f"{message}: the cluster has {_listed(parts)} on {nodes} node{'s' * (nodes != 1)}"


def _amounts(resources: Mapping[str, float]) -> str:
    """``{"CPU": 1, "GPU": 1}`` as ``1 CPU and 1 GPU``."""
    return _listed([_amount(kind, value) for kind, value in resources.items() if value])


def _listed(parts: list[str]) -> str:
    return f"{', '.join(parts[:-1])} and {parts[-1]}" if len(parts) > 1 else parts[0]


def _amount(kind: str, value: float) -> str:
    plural = "s" if kind in ("CPU", "GPU") and value != 1 else ""
    return f"{value:g} {kind}{plural}"


def _release(actors: list[Any], placement: PlacementGroup | None) -> None:
    """Kill ``actors`` (SIGKILL, no restart) and remove ``placement``, ignoring what is gone."""
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already dead
            pass
    if placement is not None:
        try:
            remove_placement_group(placement)
        except Exception:  # already removed, or the cluster is going away
            pass


class StopRequested(Exception):
    """Raised by :meth:`WorkerGroup.gather` when its ``should_stop`` answers true."""


def _bundles(
    num_workers: int,
    num_cpus: float,
    num_gpus: float,
    resources: Mapping[str, float] | Sequence[Mapping[str, float]] | None,
) -> list[dict[str, float]]:
    if resources is None or isinstance(resources, Mapping):
        per_rank: list[Mapping[str, float]] = [resources or {}] * num_workers
    else:
        per_rank = list(resources)
        if len(per_rank) != num_workers:
            raise ValueError(f"{len(per_rank)} resource mappings for {num_workers} workers")
    bundles = []
    for extra in per_rank:
        bundle: dict[str, float] = {}
        if num_cpus:
            bundle["CPU"] = float(num_cpus)
        if num_gpus:
            bundle["GPU"] = float(num_gpus)
        bundle.update({k: float(v) for k, v in extra.items()})
        if not bundle:
            raise ValueError("a worker needs some resource (CPU, GPU or custom)")
        bundles.append(bundle)
    return bundles
