"""Tests of broker.images: URL signing, keys, variants, minted URLs and the /i/ redirect."""
