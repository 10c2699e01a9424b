"""Dependencies of the routes, as ``Annotated`` aliases."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.artifacts import ArtifactStore
from service.auth import cached_team, team_for_token
from service.context import ServiceContext
from service.models import Team

_bearer = HTTPBearer(auto_error=False)


def get_context(request: Request) -> ServiceContext:
    context: ServiceContext = request.app.state.context
    return context


ContextDep = Annotated[ServiceContext, Depends(get_context)]


async def get_session(context: ContextDep) -> AsyncIterator[Session]:
    # Opening a session touches no connection; closing one may (it returns the
    # connection to the pool), so that part runs off the event loop.
    session = context.session_factory()
    try:
        yield session
    finally:
        await run_in_threadpool(session.close)


SessionDep = Annotated[Session, Depends(get_session)]


def get_store(context: ContextDep) -> ArtifactStore:
    return context.store


StoreDep = Annotated[ArtifactStore, Depends(get_store)]


async def get_team(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Team:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    team = cached_team(credentials.credentials)
    if team is None:
        team = await run_in_threadpool(
            team_for_token, session=session, token=credentials.credentials
        )
    if team is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "invalid token", headers={"WWW-Authenticate": "Bearer"}
        )
    return team


TeamDep = Annotated[Team, Depends(get_team)]
