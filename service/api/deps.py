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


async def get_context(request: Request) -> ServiceContext:  # async: no thread for a lookup
    context: ServiceContext = request.app.state.context
    return context


ContextDep = Annotated[ServiceContext, Depends(get_context)]


async def get_session(context: ContextDep) -> AsyncIterator[Session]:
    # Opening a session touches no connection; closing one that holds a connection
    # returns it to the pool, which may talk to the database, so that part runs off
    # the event loop. A session whose work committed holds none.
    session = context.session_factory()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


SessionDep = Annotated[Session, Depends(get_session)]


async def get_store(context: ContextDep) -> ArtifactStore:
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
        team = await run_in_threadpool(_verify, session, credentials.credentials)
    if team is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "invalid token", headers={"WWW-Authenticate": "Bearer"}
        )
    return team


def _verify(session: Session, token: str) -> Team | None:
    team = team_for_token(session=session, token=token)
    # End the read, so that the request holds no connection while it waits for
    # its body or for a thread.
    session.commit()
    return team


TeamDep = Annotated[Team, Depends(get_team)]
