"""Tests of broker.upstream: the Cloudflare Images client and the shared upstream budget."""
