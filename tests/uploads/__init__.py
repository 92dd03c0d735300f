"""Tests of broker.uploads: the API, quotas, completion, notifications."""
