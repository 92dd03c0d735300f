"""Plain-text output of the operators' commands: UTC times, aligned tables."""

from __future__ import annotations

from datetime import UTC, datetime

from broker.platform.text import table, utc_minute


def test_utc_minute_shows_a_date_and_time_or_a_dash():
    assert utc_minute(datetime(2026, 1, 31, 9, 5, 59, tzinfo=UTC)) == "2026-01-31 09:05Z"
    assert utc_minute(None) == "-"


def test_table_aligns_columns_to_their_widest_cell():
    lines = table(("NAME", "STATE"), [("alice", "active"), ("bo", "deactivated")])
    assert lines == ["NAME   STATE", "alice  active", "bo     deactivated"]
    assert table(("ID", "NAME"), []) == ["ID  NAME"]
