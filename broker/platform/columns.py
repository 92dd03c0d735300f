"""Column types shared by the features' models."""

from __future__ import annotations

import enum
from typing import Any, TypeVar

import sqlalchemy as sa

E = TypeVar("E", bound=enum.StrEnum)


class StrEnumText(sa.types.TypeDecorator[E]):
    """A `StrEnum` stored as its plain string value, and read back as the enum.

    The column stays a VARCHAR holding the same strings as before (no migration, no database
    enum type to alter when a member is added); a value outside the enum fails the write.
    """

    impl = sa.String
    cache_ok = True

    def __init__(self, enum_type: type[E], length: int) -> None:
        super().__init__(length)
        self.enum_type = enum_type

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> str | None:
        return None if value is None else self.enum_type(value).value

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> E | None:
        return None if value is None else self.enum_type(value)
