"""A small client of the REST API, used by the command line."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from core.errors import format_loc
from service.schemas import STREAM_END
from service.settings import get_settings

DEFAULT_URL = "http://127.0.0.1:8000"
#: How long :meth:`Client.events` tries to reconnect a dropped stream, and how often.
RECONNECT_S = 60.0
RECONNECT_PAUSE_S = 0.5
#: Longest silence on an events stream before it counts as dropped (the server sends
#: a keepalive comment every 15 s).
EVENTS_READ_TIMEOUT_S = 60.0
TOKEN_FILE = "token"


class ApiError(RuntimeError):
    def __init__(self, status_code: int, detail: Any) -> None:
        super().__init__(f"HTTP {status_code}: {_describe(detail)}")
        self.status_code = status_code
        self.detail = detail


class ApiUnreachable(RuntimeError):
    """No answer from the API (nothing listening, a dropped connection, a timeout)."""


def _describe(detail: Any) -> str:
    """A response's ``detail`` for a person: a validation error's messages (each names
    its field), one per line after the first; anything else as it came."""
    if isinstance(detail, list) and detail and all(isinstance(d, dict) for d in detail):
        messages = []
        for item in detail:
            msg = str(item.get("msg", item))
            field = format_loc(tuple(item.get("loc", [])[1:]))  # after "body", "query", "path"
            messages.append(msg if msg.startswith(field) else f"{field}: {msg}")
        return "\n  ".join(messages)
    return str(detail)


def default_token() -> str | None:
    """``TRAINQ_TOKEN``, else the token that ``trainq up`` saved under ``TRAINQ_HOME``."""
    token = os.environ.get("TRAINQ_TOKEN")
    if token:
        return token
    path = get_settings().home / TOKEN_FILE
    return path.read_text().strip() if path.is_file() else None


class Client:
    def __init__(self, url: str | None = None, token: str | None = None) -> None:
        self.url = (url or os.environ.get("TRAINQ_URL") or DEFAULT_URL).rstrip("/")
        token = token or default_token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=30.0)

    @contextmanager
    def _reaching(self) -> Iterator[None]:
        """httpx's transport errors as :class:`ApiUnreachable`, naming the URL."""
        try:
            yield
        except httpx.TransportError as exc:
            raise ApiUnreachable(
                f"no answer from the API at {self.url} ({exc or type(exc).__name__}): is "
                "'trainq up' or 'trainq api' running there? (--url or TRAINQ_URL says where)"
            ) from None

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self._reaching():
            return self._check(self.http.request(method, path, **kwargs))

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            response.read()  # a streamed response's body, for its detail
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text
            raise ApiError(response.status_code, detail)
        return response

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._send("POST", "/api/v1/jobs", json=spec, headers=headers).json()

    def jobs(self, **params: Any) -> dict[str, Any]:
        params = {k: v for k, v in params.items() if v is not None}
        return self._send("GET", "/api/v1/jobs", params=params).json()

    def job(self, job_id: int) -> dict[str, Any]:
        return self._send("GET", f"/api/v1/jobs/{job_id}").json()

    def cancel(self, job_id: int) -> dict[str, Any]:
        return self._send("POST", f"/api/v1/jobs/{job_id}/cancel").json()

    def metrics(self, job_id: int, **params: Any) -> httpx.Response:
        params = {k: v for k, v in params.items() if v is not None}
        return self._send("GET", f"/api/v1/jobs/{job_id}/metrics", params=params)

    def artifact(self, job_id: int, epoch: int | None = None) -> bytes:
        """The job's final model, or its checkpoint of ``epoch``, as ``.npz`` bytes."""
        path = f"/api/v1/jobs/{job_id}/model"
        if epoch is not None:
            path = f"/api/v1/jobs/{job_id}/checkpoints/{epoch}"
        return self._send("GET", path).content

    def predict(self, job_id: int, inputs: list[Any], **options: Any) -> dict[str, Any]:
        """``{"outputs", "predictions"}`` of the job's model for ``inputs``."""
        body = {"inputs": inputs, **options}
        return self._send("POST", f"/api/v1/jobs/{job_id}/predict", json=body).json()

    def datasets(self, name: str | None = None) -> dict[str, Any]:
        path = f"/api/v1/datasets/{name}" if name else "/api/v1/datasets"
        return self._send("GET", path).json()

    def upload(self, name: str, data: bytes, fmt: str) -> dict[str, Any]:
        params = {"name": name, "format": fmt}
        return self._send("POST", "/api/v1/datasets", params=params, content=data).json()

    def events(
        self, job_id: int, *, reconnect_s: float = RECONNECT_S
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(event, data)`` pairs from the job's server-sent events until it ends.

        A connection that drops (the API restarted, a proxy cut it) is opened again,
        going on from the last event's id; after ``reconnect_s`` seconds of failed
        tries, :class:`ApiUnreachable`. A metric row may come twice across a
        reconnection (the same name and step), and the status and attempts come again.
        """
        path = f"/api/v1/jobs/{job_id}/events"
        timeout = httpx.Timeout(self.http.timeout.connect, read=EVENTS_READ_TIMEOUT_S)
        last_id: str | None = None
        failing_since: float | None = None
        while True:
            headers = {"Last-Event-ID": last_id} if last_id is not None else {}
            dropped = "it ended early"
            try:
                with (
                    self._reaching(),
                    self.http.stream("GET", path, headers=headers, timeout=timeout) as response,
                ):
                    if response.status_code == 204:  # it had ended before
                        return
                    self._check(response)
                    failing_since = None
                    event, event_id = "message", None
                    for line in response.iter_lines():
                        if line.startswith("event:"):
                            event = line[6:].strip()
                        elif line.startswith("id:"):
                            event_id = line[3:].strip()
                        elif line.startswith("data:"):
                            yield event, json.loads(line[5:])
                            last_id = event_id if event_id is not None else last_id
                            event, event_id = "message", None
            except ApiUnreachable as exc:
                if last_id is None:  # never reached it: say so at once
                    raise
                dropped = str(exc)
            if last_id == STREAM_END:
                return
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since > reconnect_s:
                raise ApiUnreachable(
                    f"job {job_id}'s events stopped coming and did not come back within "
                    f"{reconnect_s:g} s; last: {dropped}"
                )
            time.sleep(RECONNECT_PAUSE_S)


def save_token(home: Path, token: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / TOKEN_FILE
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path
