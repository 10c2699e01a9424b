"""The app in-process (``TestClient``) over the shared ``context`` fixture."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import create_token
from service.context import ServiceContext
from service.datasets import register_builtins


@dataclass
class Api:
    """The app in-process, with a token for each of two teams."""

    client: TestClient
    a: dict[str, str]
    b: dict[str, str]
    context: ServiceContext


@pytest.fixture
def api(context: ServiceContext) -> Iterator[Api]:
    with context.session_factory() as session:
        register_builtins(session=session)
        _, token_a = create_token(session=session, team_name="team-a")
        _, token_b = create_token(session=session, team_name="team-b")
    with TestClient(create_app(context)) as client:
        yield Api(
            client=client,
            a={"Authorization": f"Bearer {token_a}"},
            b={"Authorization": f"Bearer {token_b}"},
            context=context,
        )
