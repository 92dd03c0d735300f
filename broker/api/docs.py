"""The OpenAPI document and a human-readable page of it that works offline."""

from __future__ import annotations

import json

from flask import jsonify, render_template
from flask.typing import ResponseReturnValue

from broker.api import bp
from broker.api.spec import openapi_document


@bp.get("/openapi.json")
def openapi_json() -> ResponseReturnValue:
    """Serve the OpenAPI 3.1 document of every JSON endpoint."""
    return jsonify(openapi_document())


@bp.get("/docs")
def docs_page() -> ResponseReturnValue:
    """Render the API reference from the OpenAPI document (no external assets)."""
    document = openapi_document()
    return render_template("api/docs.html", doc=document, dumps=json.dumps)
