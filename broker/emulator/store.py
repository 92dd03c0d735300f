"""Persistence of the emulator: one SQLite file for records, a folder of original blobs, a cache.

A single connection guarded by a re-entrant lock keeps it safe under a threaded server; WAL and a
busy timeout keep a second process on the same data directory from failing outright.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_VARIANTS = 100

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    filename TEXT,
    creator TEXT,
    meta TEXT NOT NULL DEFAULT '{}',
    require_signed INTEGER NOT NULL DEFAULT 0,
    uploaded_ms INTEGER NOT NULL,
    draft INTEGER NOT NULL DEFAULT 0,
    expires_ms INTEGER,
    content_type TEXT,
    size INTEGER,
    width INTEGER,
    height INTEGER
);
CREATE INDEX IF NOT EXISTS images_listing ON images (draft, uploaded_ms, seq);
CREATE TABLE IF NOT EXISTS variants (
    id TEXT PRIMARY KEY,
    fit TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    never_require_signed INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS signing_keys (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    seq INTEGER NOT NULL
);
"""

# Cloudflare's built-in variant on every account.
DEFAULT_VARIANT = {"fit": "scale-down", "width": 1366, "height": 768, "metadata": "none"}


@dataclass(frozen=True)
class ImageRecord:
    """One image or draft as stored."""

    seq: int
    id: str
    filename: str | None
    creator: str | None
    meta: dict[str, Any]
    require_signed: bool
    uploaded_ms: int
    draft: bool
    expires_ms: int | None
    content_type: str | None
    size: int | None
    width: int | None
    height: int | None


@dataclass(frozen=True)
class VariantRecord:
    """One named variant."""

    id: str
    fit: str
    width: int
    height: int
    metadata: str
    never_require_signed: bool

    def options(self) -> dict[str, Any]:
        """Return the wire `options` object."""
        return {
            "fit": self.fit,
            "width": self.width,
            "height": self.height,
            "metadata": self.metadata,
        }

    def digest(self) -> str:
        """Return a short hash of the options, so an edited variant misses the old cache."""
        raw = json.dumps(self.options(), sort_keys=True).encode()
        return hashlib.sha256(raw).hexdigest()[:16]


@dataclass
class NewImage:
    """Fields of an image about to be inserted."""

    id: str
    uploaded_ms: int
    creator: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    require_signed: bool = False
    filename: str | None = None
    draft: bool = False
    expires_ms: int | None = None
    content_type: str | None = None
    width: int | None = None
    height: int | None = None


class AlreadyExists(Exception):
    """The id is taken."""


class TooMany(Exception):
    """A count limit (variants) is reached."""


def _row_to_image(row: sqlite3.Row) -> ImageRecord:
    return ImageRecord(
        seq=row["seq"],
        id=row["id"],
        filename=row["filename"],
        creator=row["creator"],
        meta=json.loads(row["meta"]),
        require_signed=bool(row["require_signed"]),
        uploaded_ms=row["uploaded_ms"],
        draft=bool(row["draft"]),
        expires_ms=row["expires_ms"],
        content_type=row["content_type"],
        size=row["size"],
        width=row["width"],
        height=row["height"],
    )


def _row_to_variant(row: sqlite3.Row) -> VariantRecord:
    return VariantRecord(
        id=row["id"],
        fit=row["fit"],
        width=row["width"],
        height=row["height"],
        metadata=row["metadata"],
        never_require_signed=bool(row["never_require_signed"]),
    )


def _new_key_value() -> str:
    return secrets.token_urlsafe(32)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class Store:
    """Images, drafts, variants and signing keys of the one emulated account."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self.blob_dir = self.data_dir / "blobs"
        self.cache_dir = self.data_dir / "cache"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            self.data_dir / "emulator.sqlite3",
            check_same_thread=False,
            isolation_level=None,
            timeout=10,
        )
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
            with self._tx() as cur:
                if cur.execute("SELECT 1 FROM variants WHERE id = 'public'").fetchone() is None:
                    cur.execute(
                        "INSERT INTO variants VALUES ('public', :fit, :width, :height, :metadata,"
                        " 0, 0)",
                        DEFAULT_VARIANT,
                    )
                if cur.execute("SELECT 1 FROM signing_keys").fetchone() is None:
                    cur.execute(
                        "INSERT INTO signing_keys VALUES ('default', ?, 0)", (_new_key_value(),)
                    )

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")
            finally:
                cur.close()

    def _query(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # Paths. Ids may hold "/" and any UTF-8, so files are named by a hash of the id.

    @staticmethod
    def _key(image_id: str) -> str:
        return hashlib.sha256(image_id.encode()).hexdigest()

    def blob_path(self, image_id: str) -> Path:
        """Return where the original bytes of an image live."""
        key = self._key(image_id)
        return self.blob_dir / key[:2] / key

    def image_cache_dir(self, image_id: str) -> Path:
        """Return the folder holding the transformed outputs of an image."""
        key = self._key(image_id)
        return self.cache_dir / key[:2] / key

    def read_blob(self, image_id: str) -> bytes:
        """Return the original bytes of an image."""
        return self.blob_path(image_id).read_bytes()

    # Images.

    def get_image(self, image_id: str) -> ImageRecord | None:
        """Return an image or draft by id."""
        rows = self._query("SELECT * FROM images WHERE id = ?", (image_id,))
        return _row_to_image(rows[0]) if rows else None

    def insert_image(self, new: NewImage, blob: bytes | None = None) -> ImageRecord:
        """Insert an image (with its bytes) or a draft; raise AlreadyExists on a taken id."""
        with self._tx() as cur:
            if cur.execute("SELECT 1 FROM images WHERE id = ?", (new.id,)).fetchone():
                raise AlreadyExists(new.id)
            if blob is not None:
                atomic_write(self.blob_path(new.id), blob)
            cur.execute(
                "INSERT INTO images (id, filename, creator, meta, require_signed, uploaded_ms,"
                " draft, expires_ms, content_type, size, width, height)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    new.id,
                    new.filename,
                    new.creator,
                    json.dumps(new.meta),
                    int(new.require_signed),
                    new.uploaded_ms,
                    int(new.draft),
                    new.expires_ms,
                    new.content_type,
                    len(blob) if blob is not None else None,
                    new.width,
                    new.height,
                ),
            )
        image = self.get_image(new.id)
        assert image is not None
        return image

    def complete_draft(
        self,
        image_id: str,
        now_ms: int,
        blob: bytes,
        *,
        filename: str | None,
        content_type: str,
        width: int | None,
        height: int | None,
    ) -> tuple[str, ImageRecord | None]:
        """Turn a pending draft into an image atomically.

        Return ("ok", image), or ("unknown" | "used" | "expired", None) when the link is not
        (or no longer) usable, so two racing uploads to one link cannot both win.
        """
        with self._tx() as cur:
            row = cur.execute(
                "SELECT draft, expires_ms FROM images WHERE id = ?", (image_id,)
            ).fetchone()
            if row is None:
                return "unknown", None
            if not row["draft"]:
                return "used", None
            if row["expires_ms"] is not None and row["expires_ms"] <= now_ms:
                return "expired", None
            atomic_write(self.blob_path(image_id), blob)
            cur.execute(
                "UPDATE images SET draft = 0, expires_ms = NULL, filename = ?, content_type = ?,"
                " size = ?, width = ?, height = ?, uploaded_ms = ? WHERE id = ?",
                (filename, content_type, len(blob), width, height, now_ms, image_id),
            )
        image = self.get_image(image_id)
        return "ok", image

    def update_image(self, image_id: str, **fields: Any) -> ImageRecord | None:
        """Change `creator`, `meta` or `require_signed` of an image; None when it is unknown."""
        allowed = {"creator", "meta", "require_signed"}
        assert set(fields) <= allowed
        values = {
            k: json.dumps(v) if k == "meta" else int(v) if k == "require_signed" else v
            for k, v in fields.items()
        }
        with self._tx() as cur:
            if not cur.execute("SELECT 1 FROM images WHERE id = ?", (image_id,)).fetchone():
                return None
            if values:
                sets = ", ".join(f"{k} = :{k}" for k in values)
                cur.execute(f"UPDATE images SET {sets} WHERE id = :id", {**values, "id": image_id})  # noqa: S608
        if "require_signed" in fields:
            # Cloudflare purges every cached copy on an access-control change.
            shutil.rmtree(self.image_cache_dir(image_id), ignore_errors=True)
        return self.get_image(image_id)

    def delete_image(self, image_id: str) -> bool:
        """Delete an image or draft with its bytes and cached outputs; False when unknown."""
        with self._tx() as cur:
            deleted = cur.execute("DELETE FROM images WHERE id = ?", (image_id,)).rowcount
            if deleted:
                with contextlib.suppress(FileNotFoundError):
                    self.blob_path(image_id).unlink()
                shutil.rmtree(self.image_cache_dir(image_id), ignore_errors=True)
        return bool(deleted)

    def list_images(
        self,
        *,
        creator: str | None,
        descending: bool,
        after: tuple[int, int] | None = None,
    ) -> Iterator[ImageRecord]:
        """Yield finished images by upload time, optionally after a (uploaded_ms, seq) position.

        `creator=None` means any creator, `""` means images without one.
        """
        where = ["draft = 0"]
        params: list[Any] = []
        if creator == "":
            where.append("(creator IS NULL OR creator = '')")
        elif creator is not None:
            where.append("creator = ?")
            params.append(creator)
        op = "<" if descending else ">"
        if after is not None:
            where.append(f"(uploaded_ms, seq) {op} (?, ?)")
            params.extend(after)
        order = "DESC" if descending else "ASC"
        sql = (
            f"SELECT * FROM images WHERE {' AND '.join(where)}"  # noqa: S608
            f" ORDER BY uploaded_ms {order}, seq {order}"
        )
        for row in self._query(sql, params):
            yield _row_to_image(row)

    def count_images(self) -> int:
        """Return how many finished images exist."""
        return int(self._query("SELECT COUNT(*) FROM images WHERE draft = 0")[0][0])

    # Variants.

    def list_variants(self) -> list[VariantRecord]:
        """Return every variant in creation order."""
        return [_row_to_variant(r) for r in self._query("SELECT * FROM variants ORDER BY seq")]

    def get_variant(self, variant_id: str) -> VariantRecord | None:
        """Return a variant by id."""
        rows = self._query("SELECT * FROM variants WHERE id = ?", (variant_id,))
        return _row_to_variant(rows[0]) if rows else None

    def create_variant(self, variant: VariantRecord) -> VariantRecord:
        """Add a variant; raise AlreadyExists or TooMany."""
        with self._tx() as cur:
            if cur.execute("SELECT 1 FROM variants WHERE id = ?", (variant.id,)).fetchone():
                raise AlreadyExists(variant.id)
            count, top = cur.execute("SELECT COUNT(*), MAX(seq) FROM variants").fetchone()
            if count >= MAX_VARIANTS:
                raise TooMany(variant.id)
            cur.execute(
                "INSERT INTO variants VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    variant.id,
                    variant.fit,
                    variant.width,
                    variant.height,
                    variant.metadata,
                    int(variant.never_require_signed),
                    (top or 0) + 1,
                ),
            )
        return variant

    def update_variant(self, variant: VariantRecord) -> VariantRecord | None:
        """Replace a variant's options; None when it is unknown."""
        with self._tx() as cur:
            changed = cur.execute(
                "UPDATE variants SET fit = ?, width = ?, height = ?, metadata = ?,"
                " never_require_signed = ? WHERE id = ?",
                (
                    variant.fit,
                    variant.width,
                    variant.height,
                    variant.metadata,
                    int(variant.never_require_signed),
                    variant.id,
                ),
            ).rowcount
        return variant if changed else None

    def delete_variant(self, variant_id: str) -> bool:
        """Delete a variant; False when it is unknown."""
        with self._tx() as cur:
            return bool(cur.execute("DELETE FROM variants WHERE id = ?", (variant_id,)).rowcount)

    # Signing keys.

    def list_keys(self) -> list[tuple[str, str]]:
        """Return every (name, value) in creation order."""
        rows = self._query("SELECT name, value FROM signing_keys ORDER BY seq")
        return [(r["name"], r["value"]) for r in rows]

    def put_key(self, name: str) -> list[tuple[str, str]]:
        """Create (or roll the value of) a named key; return all keys."""
        with self._tx() as cur:
            top = cur.execute("SELECT MAX(seq) FROM signing_keys").fetchone()[0]
            cur.execute(
                "INSERT INTO signing_keys VALUES (?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET value = excluded.value, seq = excluded.seq",
                (name, _new_key_value(), (top or 0) + 1),
            )
        return self.list_keys()

    def delete_key(self, name: str) -> list[tuple[str, str]] | None:
        """Delete a key, minting a new `default` when it was the last; None when unknown."""
        with self._tx() as cur:
            if not cur.execute("DELETE FROM signing_keys WHERE name = ?", (name,)).rowcount:
                return None
            if cur.execute("SELECT 1 FROM signing_keys").fetchone() is None:
                top = cur.execute("SELECT MAX(seq) FROM signing_keys").fetchone()[0]
                cur.execute(
                    "INSERT INTO signing_keys VALUES ('default', ?, ?)",
                    (_new_key_value(), (top or 0) + 1),
                )
        return self.list_keys()
