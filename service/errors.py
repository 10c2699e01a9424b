"""Errors of the service layer; the app turns each into its HTTP status."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core import SpecError


class ServiceError(Exception):
    status_code = 400

    def __init__(self, detail: Any) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(ServiceError):
    status_code = 404


class Conflict(ServiceError):
    status_code = 409


class Invalid(ServiceError):
    """A 422 naming the field, in FastAPI's own shape: ``[{"loc", "msg", "type"}]``."""

    status_code = 422

    def __init__(self, loc: tuple[str | int, ...], msg: str) -> None:
        super().__init__([{"loc": list(loc), "msg": msg, "type": "value_error"}])
        self.loc = loc
        self.msg = msg

    @classmethod
    def in_body(cls, error: SpecError) -> Invalid:
        """The 422 of a request body whose field ``error.loc`` is invalid."""
        return cls(("body", *error.loc), str(error))
