"""The audit log: who changed what, when, in which request, before and after.

Offers `record` (write one entry in the caller's unit of work), `snapshot` (the fields of a row
worth keeping, secrets left out), `recent` (newest first) and the `AuditRecord` model; its
routes (`GET /api/v1/audit`) and command (`flask audit`) live in `api` and `cli`.

Rules it enforces: every administrative change writes exactly one entry, in the same
transaction as the change (a rolled-back change leaves no entry, a committed one always has
one); nothing that looks like a secret (passwords, hashes, tokens, keys' values) is ever
stored, whatever a caller passes; the actor is taken from the request (the admin, or the
service key) or, in a `flask` command, from the shell's user.
"""
