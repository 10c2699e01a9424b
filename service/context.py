"""What the API and the dispatcher share: settings, database, artifact store."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.artifacts import ArtifactStore
from service.db import make_engine, make_sessionmaker
from service.jobs import Limits, SubmissionCache
from service.settings import Settings


@dataclass
class ServiceContext:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    store: ArtifactStore
    #: Workers the cluster can ever give one job; None when no Ray is attached.
    cluster_workers: int | None = None
    #: GPUs in the cluster; None when unknown (no Ray attached, or not asked).
    cluster_gpus: int | None = None
    #: Whether /readyz must also see Ray (embedded mode and dispatchers).
    needs_ray: bool = False
    #: Dataset resolutions and parameter counts that validating submissions reuses.
    submissions: SubmissionCache = field(default_factory=SubmissionCache)
    extra: dict[str, object] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> ServiceContext:
        engine = make_engine(settings.resolved_database_url())
        store = ArtifactStore(settings.resolved_artifact_dir())
        return cls(
            settings=settings,
            engine=engine,
            session_factory=make_sessionmaker(engine),
            store=store,
            cluster_workers=settings.max_cluster_workers,
            submissions=SubmissionCache(store=store),
        )

    @property
    def limits(self) -> Limits:
        return Limits(
            max_total_params=self.settings.max_total_params,
            cluster_workers=self.cluster_workers,
            cluster_gpus=self.cluster_gpus,
        )
