"""The base of the spec's pydantic models, and their errors as :class:`InvalidValue`.

The search spec is a tree of frozen pydantic models (:mod:`search.spec`, and the search space of
:mod:`search.space`): their field types are the published schema (``/openapi.json``, ``/docs``)
and the validation, one declaration for both. A pydantic ``ValidationError`` is turned into the
domain's one error type here, naming the dotted field (``space.kernel_sizes[1]``) and the allowed
values, which are read from the same JSON schema a client sees. A check across fields raises
:class:`InvalidValue` itself inside a validator; it comes out unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from search.errors import InvalidValue

JSON_VALUES = "a JSON object with string keys and JSON values"
_M = TypeVar("_M", bound="SpecModel")


class SpecModel(BaseModel):
    """Frozen, unknown keys forbidden; construction and :meth:`from_dict` raise InvalidValue.

    ``path`` is where the model sits in a SearchSpec (``training``; empty for the spec itself),
    so that a section constructed on its own names its fields as the whole spec would.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    path: ClassVar[str] = ""

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise invalid_value(exc, type(self)) from None

    @classmethod
    def from_dict(cls: type[_M], data: Mapping[str, Any]) -> _M:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise invalid_value(exc, cls) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values: tuples as lists."""
        return self.model_dump(mode="json")

    def _at(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name


def invalid_value(exc: ValidationError, model: type[SpecModel]) -> InvalidValue:
    """The first error of ``exc``, as InvalidValue at its dotted path below ``model.path``."""
    error = exc.errors(include_url=False)[0]
    original = (error.get("ctx") or {}).get("error")
    if isinstance(original, InvalidValue):
        return original
    loc = tuple(error["loc"])
    schema = _schema(model)
    if error["type"] == "extra_forbidden":
        parent = _node(schema, loc[:-1], schema)
        return InvalidValue(
            _dotted(model.path, loc[:-1]), loc[-1], tuple(parent.get("properties", ()))
        )
    node = _node(schema, loc, schema)
    allowed = describe(node, schema) if node else error["msg"]
    return InvalidValue(_dotted(model.path, loc), error.get("input"), allowed)


@functools.cache
def _schema(model: type[SpecModel]) -> dict[str, Any]:
    return model.model_json_schema()


def _dotted(root: str, loc: Sequence[int | str]) -> str:
    path = root
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else part
    return path or "spec"


def _resolve(node: Mapping[str, Any], schema: Mapping[str, Any]) -> Mapping[str, Any]:
    """``node`` with a ``$ref`` followed, and a nullable ``anyOf`` reduced to its non-null part."""
    if "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    options = [n for n in node.get("anyOf", ()) if n.get("type") != "null"]
    if len(options) == 1:
        merged = {k: v for k, v in node.items() if k != "anyOf"}
        return {**_resolve(options[0], schema), **merged}
    return node


def _node(
    node: Mapping[str, Any], loc: Sequence[int | str], schema: Mapping[str, Any]
) -> Mapping[str, Any]:
    """The schema of the value at ``loc`` below ``node``; empty where the schema does not say."""
    node = _resolve(node, schema)
    if not loc:
        return node
    head, rest = loc[0], loc[1:]
    if isinstance(head, int):
        child = node.get("items")
    else:
        child = node.get("properties", {}).get(head, node.get("additionalProperties"))
    return _node(child, rest, schema) if isinstance(child, Mapping) else {}


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe(node: Mapping[str, Any], schema: Mapping[str, Any], *, quoted: bool = True) -> str:
    """The values a JSON schema node allows, in words: ``'sgd', 'adamw'``, ``an integer >= 1``,
    ``a number > 0 and < 1``, ``a non-empty list of 1, 3, 5``."""
    node = _resolve(node, schema)
    choices = node.get("enum", [node["const"]] if "const" in node else None)
    if choices is not None:
        return ", ".join(repr(c) if quoted and isinstance(c, str) else str(c) for c in choices)
    kind = node.get("type")
    if kind == "boolean":
        return "True, False"
    if kind in ("integer", "number"):
        return _range(node, "an integer" if kind == "integer" else "a number")
    if kind == "string":
        most = node.get("maxLength")
        return "a string" if most is None else f"a string of at most {most} characters"
    if kind == "array":
        items = node.get("items")
        what = describe(items, schema, quoted=False) if isinstance(items, Mapping) else "values"
        return ("a non-empty list of " if node.get("minItems") else "a list of ") + what
    if kind == "object" and "properties" in node:
        return "a mapping with the fields " + ", ".join(node["properties"])
    if kind == "object":
        return JSON_VALUES
    return "a value as the schema describes"


def _range(node: Mapping[str, Any], what: str) -> str:
    low, high = node.get("minimum"), node.get("maximum")
    if low is not None and high is not None:
        return f"{what} from {_number(low)} to {_number(high)}"
    bounds = []
    if low is not None:
        bounds.append(f">= {_number(low)}")
    if "exclusiveMinimum" in node:
        bounds.append(f"> {_number(node['exclusiveMinimum'])}")
    if high is not None:
        bounds.append(f"<= {_number(high)}")
    if "exclusiveMaximum" in node:
        bounds.append(f"< {_number(node['exclusiveMaximum'])}")
    return " and ".join([f"{what} {bounds[0]}", *bounds[1:]]) if bounds else what
