"""Metadata filters of the v2 listing: `meta.<field>[<op>]=<value>` (no Flask here)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from broker.emulator.errors import CfError

MAX_META_FILTERS = 5
MAX_META_DEPTH = 5
MAX_IN_VALUES = 10
_FILTER_RE = re.compile(r"^meta\.(.+)\[([a-z]+)(?::([a-z]+))?\]$")

# (path, operator, value kind or None, values)
MetaFilter = tuple[list[str], str, str | None, list[str]]

_MISSING = object()


def _lookup(meta: Any, path: list[str]) -> Any:
    for part in path:
        if not isinstance(meta, dict) or part not in meta:
            return _MISSING
        meta = meta[part]
    return meta


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _match_one(value: Any, op: str, kind: str | None, arg: str) -> bool:
    if op in ("gt", "gte", "lt", "lte"):
        num = _number(value)
        if num is None:
            return False
        target = float(arg)
        return {
            "gt": num > target,
            "gte": num >= target,
            "lt": num < target,
            "lte": num <= target,
        }[op]
    if kind == "number":
        num = _number(value)
        return num is not None and num == float(arg)
    if kind == "boolean":
        return isinstance(value, bool) and value == (arg == "true")
    if kind == "string":
        return isinstance(value, str) and value == arg
    return not isinstance(value, dict | list) and _text(value) == arg


def parse_meta_filters(params: Iterable[tuple[str, str]]) -> list[MetaFilter]:
    """Parse `meta.<field>[<op>]` query parameters (eq, in, gt, gte, lt, lte, typed)."""
    filters: list[MetaFilter] = []
    for key, arg in params:
        if not key.startswith("meta."):
            continue
        match = _FILTER_RE.match(key)
        if not match:
            raise CfError(5400, f"Invalid metadata filter {key!r}")
        field, op, kind = match.groups()
        path = field.split(".")
        valid_kinds = {
            "eq": (None, "string", "number", "boolean"),
            "in": (None, "string", "number"),
        }.get(op, (None, "number"))
        if op not in ("eq", "in", "gt", "gte", "lt", "lte") or kind not in valid_kinds:
            raise CfError(5400, f"Invalid metadata filter operator in {key!r}")
        if len(path) > MAX_META_DEPTH or "" in path:
            raise CfError(5400, f"Metadata filter {key!r} nests too deep")
        values = arg.split("|") if op == "in" else [arg]
        if op == "in" and len(values) > MAX_IN_VALUES:
            raise CfError(5400, "At most 10 values in an `in` filter")
        if op in ("gt", "gte", "lt", "lte") or kind == "number":
            try:
                [float(v) for v in values]
            except ValueError as exc:
                raise CfError(5400, f"Metadata filter {key!r} needs a number") from exc
        if kind == "boolean" and arg not in ("true", "false"):
            raise CfError(5400, f"Metadata filter {key!r} needs true or false")
        filters.append((path, op, kind, values))
    if len(filters) > MAX_META_FILTERS:
        raise CfError(5400, f"At most {MAX_META_FILTERS} metadata filters")
    return filters


def matches(meta: dict[str, Any], filters: list[MetaFilter]) -> bool:
    """Tell whether an image's metadata satisfies every filter (AND)."""
    for path, op, kind, values in filters:
        value = _lookup(meta, path)
        if value is _MISSING:
            return False
        base = "eq" if op == "in" else op
        if not any(_match_one(value, base, kind, v) for v in values):
            return False
    return True
