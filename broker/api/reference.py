"""Turn the OpenAPI document into what the docs page shows: field lists, types, examples.

Pure (no Flask): it reads the document's JSON and returns plain data for the template, so the
page says exactly what the document says.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from markupsafe import Markup, escape

_REF = "#/components/schemas/"
_SAFE = ("get", "head", "options")


@dataclass(frozen=True)
class TypeLabel:
    """A field's type as text, with the schema it links to (if any)."""

    text: str
    link: str | None = None


@dataclass(frozen=True)
class FieldRow:
    """One field, parameter or header as the page lists it."""

    name: str
    types: tuple[TypeLabel, ...]
    required: bool
    description: str
    rules: tuple[str, ...] = ()
    location: str | None = None  # "path", "query", "header" for parameters


@dataclass(frozen=True)
class ErrorRow:
    """One error an operation can answer."""

    status: str
    code: str
    message: str
    headers: tuple[str, ...]


@dataclass(frozen=True)
class ResponseView:
    """One success answer of an operation."""

    status: str
    description: str
    headers: tuple[FieldRow, ...]
    schema: TypeLabel | None
    example: str | None


@dataclass
class OperationView:
    """Everything the page shows about one operation."""

    anchor: str
    method: str
    path: str
    summary: str
    description: str
    tag: str
    auth: bool
    parameters: list[FieldRow]
    body: list[FieldRow] | None
    body_schema: TypeLabel | None
    body_required: bool
    body_example: str | None
    responses: list[ResponseView]
    errors: list[ErrorRow]


@dataclass
class SchemaView:
    """One component schema: its fields, or its values for an enum."""

    name: str
    description: str
    fields: list[FieldRow] = field(default_factory=list)
    example: str | None = None


def anchor(name: str) -> str:
    """Return the page anchor of a component schema."""
    return "schema-" + name


def inline(text: str, *, paragraphs: bool = True) -> Markup:
    """Render the document's light markdown: `code`, **bold**, and paragraphs unless told not to
    (all else escaped)."""
    blocks = []
    for block in re.split(r"\n\s*\n", text.strip()):
        html = str(escape(" ".join(block.split())))
        html = re.sub(r"`([^`]+)`", r"<code>\1</code>", html)
        html = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", html)
        blocks.append(html)
    if not paragraphs:
        html = " ".join(blocks)
    else:
        html = "<p>" + "</p><p>".join(blocks) + "</p>" if blocks else ""
    # Safe: every block was escaped above; only our own tags were added.
    return Markup(html)  # noqa: S704


def pretty(value: Any) -> str:
    """Return an example as indented JSON."""
    return json.dumps(value, indent=2, ensure_ascii=False)


def resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow `$ref`s inside the document."""
    while "$ref" in node:
        target: Any = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def type_labels(schema: dict[str, Any]) -> tuple[TypeLabel, ...]:
    """Describe a schema's type: `string`, `integer | null`, `array of UploadOut`, …"""
    if "$ref" in schema:
        name = schema["$ref"].removeprefix(_REF)
        return (TypeLabel(name, anchor(name)),)
    if "anyOf" in schema:
        return tuple(label for option in schema["anyOf"] for label in type_labels(option))
    kind = schema.get("type")
    if kind == "array":
        items = type_labels(schema.get("items", {}))
        return tuple(TypeLabel(f"array of {label.text}", label.link) for label in items)
    if kind == "string" and schema.get("format") == "date-time":
        return (TypeLabel("date-time (RFC 3339)"),)
    if kind is None:
        return (TypeLabel("any"),) if "const" not in schema else (TypeLabel("string"),)
    return (TypeLabel(str(kind)),)


def rules(schema: dict[str, Any]) -> tuple[str, ...]:
    """The constraints of a schema, in words: one of, bounds, lengths, pattern, default."""
    found: list[str] = []
    options = [schema, *schema.get("anyOf", [])]
    for option in options:
        if "enum" in option:
            found.append("one of " + ", ".join(f"`{v}`" for v in option["enum"]))
        if "const" in option:
            found.append(f"always `{option['const']}`")
        for key, words in (
            ("minimum", "≥ {}"),
            ("maximum", "≤ {}"),
            ("minLength", "at least {} characters"),
            ("maxLength", "at most {} characters"),
            ("minItems", "at least {} items"),
            ("maxItems", "at most {} items"),
            ("pattern", "matches `{}`"),
        ):
            if key in option:
                found.append(words.format(option[key]))
    if schema.get("default") is not None:
        default = schema["default"]
        found.append(
            f"default `{json.dumps(default) if not isinstance(default, str) else default}`"
        )
    return tuple(found)


def fields(doc: dict[str, Any], schema: dict[str, Any]) -> list[FieldRow]:
    """List an object schema's properties, required ones first."""
    schema = resolve(doc, schema)
    required = set(schema.get("required", []))
    rows = [
        FieldRow(
            name=name,
            types=type_labels(prop),
            required=name in required,
            description=prop.get("description", ""),
            rules=rules(prop),
        )
        for name, prop in schema.get("properties", {}).items()
    ]
    return sorted(rows, key=lambda r: not r.required)


def _parameter(doc: dict[str, Any], param: dict[str, Any]) -> FieldRow:
    param = resolve(doc, param)
    schema = param.get("schema", {})
    return FieldRow(
        name=param["name"],
        types=type_labels(schema),
        required=bool(param.get("required")),
        description=param.get("description", ""),
        rules=rules(schema),
        location=param["in"],
    )


def _header(doc: dict[str, Any], name: str, header: dict[str, Any]) -> FieldRow:
    header = resolve(doc, header)
    return FieldRow(
        name=name,
        types=type_labels(header.get("schema", {})),
        required=bool(header.get("required")),
        description=header.get("description", ""),
    )


def operations(doc: dict[str, Any]) -> list[OperationView]:
    """Every operation of the document, in the order of its tags, then its paths."""
    order = [t["name"] for t in doc.get("tags", [])]
    views = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            views.append(_operation(doc, path, method, op))
    return sorted(
        views,
        key=lambda v: (order.index(v.tag) if v.tag in order else len(order), v.path, v.method),
    )


def _operation(doc: dict[str, Any], path: str, method: str, op: dict[str, Any]) -> OperationView:
    body = op.get("requestBody")
    media = body["content"]["application/json"] if body else None
    responses, errors = [], []
    for status, response in op["responses"].items():
        content = response.get("content", {}).get("application/json")
        if int(status) >= 400 and content and "examples" in content:
            for code, ex in content["examples"].items():
                headers = tuple(n for n in response.get("headers", {}) if n != "X-Request-ID")
                errors.append(ErrorRow(status, code, ex["value"]["error"]["message"], headers))
            continue
        responses.append(
            ResponseView(
                status=status,
                description=response.get("description", ""),
                headers=tuple(
                    _header(doc, n, h)
                    for n, h in response.get("headers", {}).items()
                    if n != "X-Request-ID"
                ),
                schema=type_labels(content["schema"])[0] if content else None,
                example=pretty(content["example"]) if content and "example" in content else None,
            )
        )
    return OperationView(
        anchor=op["operationId"],
        method=method.upper(),
        path=path,
        summary=op.get("summary", ""),
        description=op.get("description", ""),
        tag=(op.get("tags") or [""])[0],
        auth=bool(op.get("security")),
        parameters=[
            _parameter(doc, p)
            for p in op.get("parameters", [])
            if p.get("$ref") != "#/components/parameters/RequestId"
        ],
        body=fields(doc, media["schema"]) if media else None,
        body_schema=type_labels(media["schema"])[0] if media else None,
        body_required=bool(body and body.get("required")),
        body_example=pretty(media["example"]) if media and "example" in media else None,
        responses=responses,
        errors=errors,
    )


def schemas(doc: dict[str, Any]) -> list[SchemaView]:
    """Every component schema with its fields."""
    views = []
    for name, schema in doc["components"]["schemas"].items():
        examples = schema.get("examples")
        views.append(
            SchemaView(
                name=name,
                description=schema.get("description", ""),
                fields=fields(doc, schema),
                example=pretty(examples[0]) if examples else None,
            )
        )
    return views
