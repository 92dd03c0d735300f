"""Delivering images: signing keys, variants, signed URLs and the `/i/` redirect.

- `signing`: pure URL signing (HMAC-SHA256 over path and `exp`), variants parsed from settings.
- `keys`: the account's signing keys mirrored from Cloudflare, rotation, the in-process cache.
- `variants`: the declared variants (`BROKER_VARIANTS`) and their sync to Cloudflare.
- `urls`: minting signed delivery URLs for uploads the caller may see.
- `api`: `/api/v1/images/{id}/url` and the batch form; `redirect`: `GET /i/<id>/<variant>`.
- `cli`: `flask keys …` and `flask variants …`.
- `models`: `SigningKey`.
"""
