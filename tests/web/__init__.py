"""Tests of broker.web: the server-rendered pages."""
