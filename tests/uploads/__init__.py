"""Tests of broker.uploads: the API, limits, idempotency, completion, notifications."""
