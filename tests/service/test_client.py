"""The command line's API client against a real uvicorn, and against nothing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from service import queue
from service.auth import create_token
from service.client import ApiError, Client
from service.context import ServiceContext
from service.datasets import register_builtins
from tests.servers import free_port, serving
from tests.service.factories import TRIVIAL_SPEC
from tests.service.test_cli import trainq


@pytest.fixture
def served(context: ServiceContext) -> Iterator[tuple[str, str]]:
    """The API on a free port (no Ray: these routes do not need it), and a token."""
    with context.session_factory() as session:
        register_builtins(session=session)
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


def test_cancel_a_queued_and_a_running_job_and_one_that_ended(
    served: tuple[str, str], context: ServiceContext
) -> None:
    url, token = served
    client = Client(url, token)
    first, second = (client.submit(TRIVIAL_SPEC)["id"] for _ in range(2))
    claimed = queue.claim_next_job(session_factory=context.session_factory, owner="d", lease_s=60.0)
    assert claimed is not None and claimed.id == first  # the older of equal priority
    running, queued = first, second
    cancel = ("cancel", "--url", url, "--token", token)

    result = trainq(*cancel, str(queued))
    assert (result.returncode, result.stdout) == (0, f"job {queued} cancelled\n")
    result = trainq(*cancel, str(running))
    assert (result.returncode, result.stdout) == (
        0,
        f"job {running} running: asked to stop; it stops within seconds\n",
    )
    assert client.job(running)["cancel_requested"]
    result = trainq(*cancel, str(queued))
    assert (result.returncode, result.stderr) == (
        1,
        f"trainq: HTTP 409: job {queued} has already been cancelled\n",
    )
