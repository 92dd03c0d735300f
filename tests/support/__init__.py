"""Test helpers that are not tests: the OpenAPI-checking client, the webhook receiver."""
