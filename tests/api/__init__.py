"""Tests of broker.api: the OpenAPI document, `@endpoint` and the docs page."""
