"""Routes under /api/v1/datasets."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, status
from fastapi.concurrency import run_in_threadpool

from service import datasets as dataset_service
from service.api.body import raw_body_openapi, read_limited
from service.api.deps import ContextDep, SessionDep, StoreDep, TeamDep
from service.errors import Invalid, NotFound
from service.schemas import DatasetPublic, DatasetsPublic

router = APIRouter(prefix="/datasets", tags=["datasets"])
NAME_PATTERN = r"^[a-z0-9][a-z0-9_\-]{0,63}$"


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetPublic,
    openapi_extra=raw_body_openapi(
        "application/octet-stream", "the file itself, in the format that `format` names"
    ),
)
async def upload_dataset(
    request: Request,
    context: ContextDep,
    session: SessionDep,
    store: StoreDep,
    team: TeamDep,
    name: Annotated[str, Query(pattern=NAME_PATTERN)],
    format: Annotated[str, Query(pattern="^(npz|csv|txt)$")],
) -> DatasetPublic:
    """The body is the file itself: ``.npz`` with arrays X and y, ``.csv`` with numeric
    columns and a ``label`` column (or ``text,label`` for text classification), or a
    ``.txt`` corpus for a language model. Each upload under a name is its next version."""
    data = await read_limited(request, context.settings.max_upload_bytes)
    try:
        upload = await run_in_threadpool(dataset_service.parse_upload, data, kind=format, name=name)
    except dataset_service.DatasetError as exc:
        raise Invalid(("body",), str(exc)) from None
    version = await run_in_threadpool(
        dataset_service.create_version,
        session=session,
        store=store,
        team=team,
        name=name,
        upload=upload,
    )
    return DatasetPublic.model_validate(version)


@router.get("", response_model=DatasetsPublic)
def list_datasets(session: SessionDep, team: TeamDep) -> DatasetsPublic:
    rows = dataset_service.list_versions(session=session, team=team)
    return DatasetsPublic(data=[DatasetPublic.model_validate(r) for r in rows], count=len(rows))


@router.get("/{name}", response_model=DatasetsPublic)
def dataset_versions(name: str, session: SessionDep, team: TeamDep) -> DatasetsPublic:
    rows = dataset_service.list_versions(session=session, team=team, name=name)
    if not rows:
        raise NotFound(f"dataset {name!r} not found")
    return DatasetsPublic(data=[DatasetPublic.model_validate(r) for r in rows], count=len(rows))
