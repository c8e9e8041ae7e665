"""Client errors of the reward server: one exception type, and the conversion of pydantic errors into it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, ValidationError

_MAX_INPUT_REPR = 80


class FieldError(BaseModel):
    """One problem with a request, located by a dotted path such as 'items.3.visual_tokens_kept'."""

    field: str = Field(description="Dotted path of the offending field; 'body' for the body as a whole.")
    message: str
    kind: str = Field(description="Machine-readable kind, e.g. 'int_parsing', 'json_invalid', 'missing'.")


class ErrorBody(BaseModel):
    """Every 4xx/5xx response of the reward server has this shape."""

    detail: str = Field(description="One line that names the offending field(s) and what is wrong.")
    errors: list[FieldError] = Field(default_factory=list)


class ApiError(Exception):
    """A request the server refuses: HTTP status, a metrics kind, a message and the fields at fault."""

    def __init__(
        self,
        status: int,
        kind: str,
        detail: str,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail
        self.errors = errors or []
        self.headers = headers or {}

    def body(self) -> ErrorBody:
        """The JSON body sent to the client."""
        return ErrorBody(detail=self.detail, errors=self.errors)


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_INPUT_REPR else text[: _MAX_INPUT_REPR - 3] + "..."


def from_validation_error(error: ValidationError) -> ApiError:
    """400 for a body that is not JSON at all, 422 naming each offending field otherwise."""
    field_errors = []
    for item in error.errors(include_url=False):
        field = ".".join(str(part) for part in item["loc"]) or "body"
        message = item["msg"]
        scalar_input = isinstance(item.get("input"), (str, int, float, bool)) or item.get("input", 0) is None
        if item["type"] not in ("missing", "json_invalid") and scalar_input:
            message = f"{message} (got {_short_repr(item['input'])})"
        field_errors.append(FieldError(field=field, message=message, kind=item["type"]))
    summary = "; ".join(f"{fe.field}: {fe.message}" for fe in field_errors[:5])
    if len(field_errors) > 5:
        summary += f"; and {len(field_errors) - 5} more"
    if any(fe.kind == "json_invalid" for fe in field_errors):
        return ApiError(400, "malformed_json", f"request body is not valid JSON: {summary}", field_errors)
    return ApiError(422, "validation", summary, field_errors)
