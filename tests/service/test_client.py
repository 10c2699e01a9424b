"""The command line's API client against a real uvicorn, and against nothing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from service.auth import create_token
from service.client import ApiError, Client
from service.context import ServiceContext
from tests.e2e.conftest import free_port, serving
from tests.service.test_cli import trainq


@pytest.fixture
def served(context: ServiceContext) -> Iterator[tuple[str, str]]:
    """The API on a free port (no Ray: these routes do not need it), and a token."""
    with context.session_factory() as session:
        _, token = create_token(session=session, team_name="cli")
    with serving(context) as url:
        yield url, token


def test_an_error_on_a_streamed_route_reads_as_its_detail(served: tuple[str, str]) -> None:
    url, token = served
    with pytest.raises(ApiError) as info:
        next(Client(url, token).events(4040))
    assert (info.value.status_code, str(info.value)) == (404, "HTTP 404: job 4040 not found")


@pytest.mark.parametrize("command", [("jobs",), ("watch", "1"), ("metrics", "1")])
def test_no_api_listening_is_one_line_naming_the_url(command: tuple[str, ...]) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # free: nothing listens there
    result = trainq(*command, "--url", url, "--token", "tq_x")
    assert result.returncode == 1
    assert result.stderr.startswith(f"trainq: no answer from the API at {url} (")
    assert result.stderr.endswith(
        "is 'trainq up' or 'trainq api' running there? (--url or TRAINQ_URL says where)\n"
    )
    assert result.stderr.count("\n") == 1 and result.stdout == ""
