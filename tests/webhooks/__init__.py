"""Tests of broker.webhooks: signing, schedule, endpoints, sending, SSRF guard, API, CLI."""
