"""Exact money columns: integer base units of the payout token, which exceed 64 bits.

PostgreSQL stores them as NUMERIC(78, 0) (every uint256 fits) and sums them exactly; SQLite has no
integer wider than 64 bits, so it stores decimal text and sums with the `exact_sum` aggregate that
`storage.database` registers on every SQLite connection (Python integers, never floats).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import Numeric, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator, TypeEngine

UINT256_DIGITS = 78


class Amount(TypeDecorator[int]):
    """An integer amount in base units (Python int both ways; negative for debits)."""

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(Numeric(UINT256_DIGITS, 0))
        return dialect.type_descriptor(Text())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"amounts are integers in base units, got {value!r}")
        return value if dialect.name == "postgresql" else str(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> int | None:
        if value is None:
            return None
        if isinstance(value, Decimal):
            return int(value)
        return int(value)


class exact_sum(FunctionElement[int]):  # noqa: N801  (reads like SQL's sum)
    """SUM of an `Amount` column without rounding or overflow, on every backend (0 for no rows)."""

    type = Amount()
    inherit_cache = True


@compiles(exact_sum)
def _sum_default(element: exact_sum, compiler: Any, **kw: Any) -> str:
    return f"coalesce(sum({compiler.process(element.clauses, **kw)}), 0)"


@compiles(exact_sum, "sqlite")
def _sum_sqlite(element: exact_sum, compiler: Any, **kw: Any) -> str:
    return f"coalesce(exact_sum({compiler.process(element.clauses, **kw)}), '0')"


class ExactSumAggregate:
    """The SQLite aggregate behind `exact_sum`: Python integers, returned as decimal text."""

    def __init__(self) -> None:
        self.total = 0

    def step(self, value: Any) -> None:
        if value is not None:
            self.total += int(value)

    def finalize(self) -> str:
        return str(self.total)
