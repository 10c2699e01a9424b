"""The one error type of an invalid spec."""

from __future__ import annotations


class SpecError(ValueError):
    """An invalid model or job spec.

    ``loc`` is the path to the offending value, for example
    ``("model", "layers", 3, "units")``; ``layer`` is the layer index when the
    fault lies in a layer, ``field`` the field's name, ``reason`` plain words.
    """

    def __init__(
        self,
        reason: str,
        *,
        layer: int | None = None,
        layer_type: str | None = None,
        field: str | None = None,
        loc: tuple[str | int, ...] | None = None,
    ) -> None:
        self.reason = reason
        self.layer = layer
        self.layer_type = layer_type
        self.field = field
        if loc is None:
            loc = ("model",)
            if layer is not None:
                loc += ("layers", layer)
            if field is not None:
                loc += (field,)
        self.loc = loc
        super().__init__(self._message())

    def __reduce__(self) -> tuple[object, ...]:
        """Pickled (as Ray carries a worker's error back) with its fields, not its message."""
        return (_rebuild, (self.reason, self.layer, self.layer_type, self.field, self.loc))

    def _message(self) -> str:
        where = format_loc(self.loc)
        if self.layer_type is not None:
            where += f" ({self.layer_type})"
        return f"{where}: {self.reason}"


def _rebuild(
    reason: str,
    layer: int | None,
    layer_type: str | None,
    field: str | None,
    loc: tuple[str | int, ...],
) -> SpecError:
    return SpecError(reason, layer=layer, layer_type=layer_type, field=field, loc=loc)


def format_loc(loc: tuple[str | int, ...]) -> str:
    """``("model", "layers", 3, "units")`` -> ``model.layers[3].units``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text
