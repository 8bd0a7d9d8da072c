"""Delta ``add.stats`` for files we write: numRecords, minValues, maxValues, nullCount.

Stats only let readers skip files, so every bound written here is a *safe* bound:
timestamps are floored (min) and ceiled (max) to the millisecond Delta stores, and a
string longer than :data:`MAX_STRING_STAT` keeps a prefix as its min and no max.
Columns of other types (floats, lists, structs) get a null count at most.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

MAX_STRING_STAT = 256
"""Characters; longer values would bloat the log for no skipping benefit."""
_MS_PER_UNIT = {"s": 1000.0, "ms": 1.0, "us": 1e-3, "ns": 1e-6}
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def _ranged(t: pa.DataType) -> bool:
    """Types whose min/max we record."""
    return (
        pa.types.is_integer(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_date32(t)
        or (pa.types.is_timestamp(t) and t.tz is not None)
    )


def _counted(t: pa.DataType) -> bool:
    """Types whose null count we record (delta-rs records none for nested columns)."""
    return not pa.types.is_nested(t)


class StatsCollector:
    """Running per-column stats over the batches of one file."""

    __slots__ = ("_schema", "_rows", "_min", "_max", "_nulls")

    def __init__(self, schema: pa.Schema) -> None:
        self._schema = schema
        self._rows = 0
        self._min: dict[str, Any] = {}
        self._max: dict[str, Any] = {}
        self._nulls: dict[str, int] = {f.name: 0 for f in schema if _counted(f.type)}

    def update(self, batch: pa.RecordBatch) -> None:
        self._rows += batch.num_rows
        for field, column in zip(self._schema, batch.columns, strict=True):
            if field.name in self._nulls:
                self._nulls[field.name] += column.null_count
            if not _ranged(field.type) or column.null_count == len(column):
                continue
            bounds = pc.min_max(column)
            low, high = _raw(bounds["min"]), _raw(bounds["max"])
            if field.name not in self._min or low < self._min[field.name]:
                self._min[field.name] = low
            if field.name not in self._max or high > self._max[field.name]:
                self._max[field.name] = high

    def to_json(self) -> str:
        """The ``stats`` string of the file's Delta add action."""
        minimum: dict[str, Any] = {}
        maximum: dict[str, Any] = {}
        for field in self._schema:
            if field.name in self._min:
                minimum[field.name] = _render(field.type, self._min[field.name], upper=False)
                high = _render(field.type, self._max[field.name], upper=True)
                if high is not None:
                    maximum[field.name] = high
        return json.dumps(
            {
                "numRecords": self._rows,
                "minValues": minimum,
                "maxValues": maximum,
                "nullCount": self._nulls,
            },
            separators=(",", ":"),
        )


def _raw(scalar: pa.Scalar) -> Any:
    """Comparable value: an int in the column's unit for timestamps, else Python's."""
    if pa.types.is_timestamp(scalar.type):
        return scalar.value
    return scalar.as_py()


def _render(t: pa.DataType, value: Any, *, upper: bool) -> Any:
    """A JSON stat value that bounds ``value`` from below (or above when ``upper``)."""
    if pa.types.is_timestamp(t):
        # Delta stores stats at ms precision; round outward so the bound stays true.
        ms = value * _MS_PER_UNIT[t.unit]
        whole = int(-(-ms // 1)) if upper else int(ms // 1)
        stamp = _EPOCH + dt.timedelta(milliseconds=whole)
        return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"
    if pa.types.is_date32(t):
        return value.isoformat()
    if isinstance(value, str) and len(value) > MAX_STRING_STAT:
        return None if upper else value[:MAX_STRING_STAT]
    return value
