"""Tests of broker.platform: settings, database, errors, logs, headers, leases, health."""
