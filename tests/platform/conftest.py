"""Fixtures of the platform tests: scratch databases for the migration tests."""

from tests.support.databases import new_database  # noqa: F401  (a fixture)
