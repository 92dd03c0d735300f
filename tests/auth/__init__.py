"""Tests of broker.auth: sessions, CSRF, passwords, bearer tokens, route guards, the CLI."""
