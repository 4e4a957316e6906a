"""Request fields declared once: each endpoint's fields are rows of (name, JSON type, default,
limits, the SamplingParams attribute it sets, an optional hook that checks or converts it),
read by one function. A new request field is one more row (and, if it needs more than a type
and a range, a small `convert` function).

Ranges of sampling parameters are the sampler's own (SamplingParams checks them, for the
command line too); a row names the attribute and its errors come back naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .errors import ApiError
from .sampler import SamplingParams, SamplingParamsError

_KIND_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               list: "an array", dict: "an object"}  # fmt: skip


@dataclass(frozen=True)
class ModelLimits:
    """Facts of the loaded model that limits refer to (`high="n_ctx"`)."""

    n_ctx: int
    n_vocab: int


@dataclass(frozen=True)
class Field:
    """One request field.

    kind: the JSON type(s) accepted (null always counts as absent; bool is never a number and
    an integer is a fine float). low/high: inclusive bounds for numbers; high may name a
    ModelLimits attribute. convert(value, limits) checks further and returns the value to
    use, raising ApiError. sampling: the SamplingParams attribute the value sets (absent: the
    server's default)."""

    name: str
    kind: type | tuple[type, ...]
    default: Any = None
    required: bool = False
    low: float | None = None
    high: float | str | None = None
    choices: tuple[Any, ...] | None = None
    convert: Callable[[Any, ModelLimits], Any] | None = None
    sampling: str | None = None


def kind_name(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in _KIND_NAMES.items():
        if type(value) is kind:
            return name
    return type(value).__name__


def _is_kind(value: Any, kind: type) -> bool:
    if type(value) is bool:  # bool is an int in Python, never in JSON
        return kind is bool
    if kind is float:
        return type(value) in (int, float)
    return isinstance(value, kind)


def read_value(body: dict[str, Any], f: Field, limits: ModelLimits | None = None) -> Any:
    """body[f.name] checked against its row (f.default when absent)."""
    name = f.name
    value = body.get(name)
    if value is None:
        if f.required:
            raise ApiError(
                400, f"'{name}' is required", code="missing_required_parameter", param=name
            )
        return f.default
    kinds = f.kind if isinstance(f.kind, tuple) else (f.kind,)
    if not any(_is_kind(value, k) for k in kinds):
        wanted = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
        raise ApiError(400, f"'{name}' must be {wanted}, got {kind_name(value)}",
                       code="invalid_type", param=name)  # fmt: skip
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a finite number", code="invalid_value", param=name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        high = getattr(limits, f.high) if isinstance(f.high, str) else f.high
        if (f.low is not None and value < f.low) or (high is not None and value > high):
            what = (
                f"between {f.low} and {high}"
                if f.low is not None and high is not None
                else (f"at least {f.low}" if high is None else f"at most {high}")
            )
            if isinstance(f.high, str):
                what += f" (the {f.high.removeprefix('n_')} size)"
            raise ApiError(400, f"'{name}' must be {what}, got {value}", code="invalid_value",
                           param=name)  # fmt: skip
    if f.choices is not None and value not in f.choices:
        raise ApiError(400, f"'{name}' must be one of {', '.join(map(repr, f.choices))}, got {value!r}",
                       code="invalid_value", param=name)  # fmt: skip
    if f.convert is not None:
        value = f.convert(value, limits)
    return value


def read_fields(body: dict[str, Any], fields: Iterable[Field], limits: ModelLimits | None = None) -> dict[str, Any]:  # fmt: skip
    """Every declared field of the body, checked, by name (defaults filled in). Fields not
    declared are ignored, as OpenAI's clients send some that do not apply."""
    return {f.name: read_value(body, f, limits) for f in fields}


def sampling_params(values: dict[str, Any], fields: Iterable[Field], defaults: SamplingParams,
                    **fixed: Any) -> SamplingParams:  # fmt: skip
    """The server's defaults with what the request set. Rows are applied in order, so a later
    row for the same attribute (max_completion_tokens after max_tokens) wins when given.
    `fixed` sets attributes the route computes itself (n_logprobs)."""
    changes: dict[str, Any] = {}
    field_of: dict[str, str] = {}
    for f in fields:
        if f.sampling is not None and values.get(f.name) is not None:
            changes[f.sampling] = values[f.name]
            field_of[f.sampling] = f.name
    changes.update(fixed)
    try:
        return dataclasses.replace(defaults, **changes)
    except SamplingParamsError as e:
        param = field_of.get(e.param, e.param)
        message = str(e).replace(f"'{e.param}'", f"'{param}'")
        raise ApiError(400, message, code="invalid_value", param=param) from None
