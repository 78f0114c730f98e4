"""Check input rows against the data contract: typed valid rows out, quarantine rows out.

Each `validate_*` function takes a frame of strings (as `files.read_files` returns it)
and returns the valid rows with parsed columns and a quarantine frame with one row per
rejected input row: the file, line, key, field and reason. The first broken field of a
row names the reason.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import pandas as pd

from livecrm_dagster.defs.ingestion.files import FILE, LINE

BROADCAST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
VIEWING_TYPES = ("view_start", "heartbeat", "view_end")
EVENT_TYPES = (*VIEWING_TYPES, "chat", "like", "product_click", "answer", "coupon_claim")
ORDER_STATUSES = ("pending", "paid", "cancelled", "refunded")
# A later export can only move an order forward: pending, then paid, then undone.
STATUS_RANK = {"pending": 0, "paid": 1, "cancelled": 2, "refunded": 2}

QUARANTINE_COLUMNS = ["input", "file", "line", "record_key", "field", "reason"]
# The offset must follow a time of day, so the day of a bare date ("2024-06-10") is not
# read as an offset of -10 hours.
_OFFSET = re.compile(
    r"[Tt ]\d{2}(?::?\d{2}(?::?\d{2}(?:[.,]\d+)?)?)?\s?(?:[Zz]|[+-]\d{2}(?::?\d{2})?)$"
)
_INTEGER = re.compile(r"^[+-]?[0-9]+$")
# A time must start with a full calendar date, because pandas' ISO 8601 parser also
# reads a bare year ("2024", even "-5") as a time.
_CALENDAR_DATE = re.compile(r"^[0-9]{4}-?[0-9]{2}-?[0-9]{2}(?:[Tt ]|$)")
# Unix times: 9 or 10 digits are seconds (1973 to 2286), 12 or 13 are milliseconds.
_EPOCH_SECONDS = re.compile(r"^[+-]?[0-9]{9,10}(?:\.[0-9]+)?$")
_EPOCH_MILLISECONDS = re.compile(r"^[+-]?[0-9]{12,13}(?:\.[0-9]+)?$")
# ISO 8601 week dates (2024-W24-1, 2024W241) and ordinal dates (2024-162) are valid
# ISO 8601 but rejected, because shops and pandas write calendar dates.
_WEEK_DATE = re.compile(r"^[0-9]{4}-?W[0-9]{2}(?:-?[0-9])?(?:[Tt ]|$)")
_ORDINAL_DATE = re.compile(r"^[0-9]{4}-[0-9]{3}(?:[Tt ]|$)")
_TRUE = {"true", "1", "yes", "t", "y"}
_FALSE = {"false", "0", "no", "f", "n"}
_INT64_MAX = 2**63 - 1


class RowChecker:
    """Collects the first failure reason of each row."""

    def __init__(self, frame: pd.DataFrame, input_name: str, key_column: str):
        self.frame = frame
        self.input_name = input_name
        self.key_column = key_column
        self.field = pd.Series(None, index=frame.index, dtype=object)
        self.reason = pd.Series(None, index=frame.index, dtype=object)

    def flag(self, mask: pd.Series, field: str, reason: str | pd.Series) -> None:
        mask = mask.fillna(False).astype(bool) & self.reason.isna()
        if not mask.any():
            return
        self.field[mask] = field
        self.reason[mask] = reason[mask] if isinstance(reason, pd.Series) else reason

    def require(self, *columns: str) -> None:
        for column in columns:
            self.flag(text(self.frame, column) == "", column, f"{column} is missing")

    @property
    def bad(self) -> pd.Series:
        return self.reason.notna()

    def split(self, valid: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Return (valid rows of `valid`, quarantine rows) for the rows flagged so far."""
        quarantine = quarantine_frame(
            self.input_name,
            self.frame.loc[self.bad],
            self.key_column,
            self.field[self.bad],
            self.reason[self.bad],
        )
        return valid.loc[~self.bad].copy(), quarantine


def quarantine_frame(
    input_name: str,
    rows: pd.DataFrame,
    key_column: str,
    field: pd.Series | str,
    reason: pd.Series | str,
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "input": input_name,
            "file": text(rows, FILE).to_numpy(),
            "line": pd.to_numeric(rows.get(LINE, pd.Series(0, index=rows.index))).to_numpy(),
            "record_key": text(rows, key_column).to_numpy(),
            "field": field.to_numpy() if isinstance(field, pd.Series) else field,
            "reason": reason.to_numpy() if isinstance(reason, pd.Series) else reason,
        },
        columns=QUARANTINE_COLUMNS,
    )


def empty_quarantine() -> pd.DataFrame:
    return pd.DataFrame(columns=QUARANTINE_COLUMNS)


def text(frame: pd.DataFrame, column: str) -> pd.Series:
    """Return a column as stripped strings, or empty strings when the column is absent."""
    if column not in frame.columns:
        return pd.Series("", index=frame.index, dtype=object)
    return frame[column].fillna("").astype(str).str.strip().astype(object)


def parse_instants(values: pd.Series, field: str, zone: str | None) -> tuple[pd.Series, pd.Series]:
    """Parse ISO 8601 times to UTC; return (instants, reason per unparseable value).

    A time without a UTC offset is read in `zone` when the source declares one and is
    invalid otherwise, because guessing the zone shifts every instant by hours. Empty
    values give NaT with no reason; the caller decides whether the field is required.
    """
    values = values.fillna("").astype(str).str.strip()
    empty = values == ""
    dated = values.str.match(_CALENDAR_DATE).astype(bool)
    has_offset = values.str.contains(_OFFSET) & dated
    instants = pd.Series(pd.NaT, index=values.index, dtype="datetime64[us, UTC]")
    reasons = pd.Series(None, index=values.index, dtype=object)

    if has_offset.any():
        parsed = pd.to_datetime(values[has_offset], utc=True, format="ISO8601", errors="coerce")
        instants[has_offset] = parsed.astype("datetime64[us, UTC]")
    local = ~has_offset & dated
    if local.any() and zone is not None:
        naive = pd.to_datetime(values[local], format="ISO8601", errors="coerce")
        placed = naive.dt.tz_localize(zone, ambiguous="NaT", nonexistent="NaT")
        instants[local] = placed.dt.tz_convert("UTC").astype("datetime64[us, UTC]")
        skipped = local & instants.isna() & naive.reindex(values.index).notna()
        reasons[skipped] = f"{field} is ambiguous or does not exist in {zone} (a clock change)"
    elif local.any():
        # Only a value that is a time apart from its missing offset gets this reason.
        naive = pd.to_datetime(values[local], format="ISO8601", errors="coerce")
        zoneless = naive.notna().reindex(values.index, fill_value=False)
        reasons[zoneless] = f"{field} has no UTC offset and the source declares no time zone"
    unparsed = ~empty & instants.isna() & reasons.isna()
    reasons[unparsed] = _unparsed_time_reasons(values[unparsed], field)
    return instants, reasons


def _unparsed_time_reasons(values: pd.Series, field: str) -> pd.Series:
    """Explain why each value is not a time, naming the likely mix-up where there is one."""
    excerpt = values.str.slice(0, 40)
    required = f"{field} must be an ISO 8601 time with a UTC offset"
    reasons = f"{field} is not an ISO 8601 time: " + excerpt
    seconds = values.str.match(_EPOCH_SECONDS).astype(bool)
    reasons[seconds] = f"{required}; " + excerpt[seconds] + " looks like epoch seconds"
    milliseconds = values.str.match(_EPOCH_MILLISECONDS).astype(bool)
    reasons[milliseconds] = (
        f"{required}; " + excerpt[milliseconds] + " looks like epoch milliseconds"
    )
    week = values.str.match(_WEEK_DATE).astype(bool)
    reasons[week] = (
        f"{field} is an ISO 8601 week date, which is not accepted; use a calendar date "
        "(YYYY-MM-DD): " + excerpt[week]
    )
    ordinal = values.str.match(_ORDINAL_DATE).astype(bool)
    reasons[ordinal] = (
        f"{field} is an ISO 8601 ordinal date, which is not accepted; use a calendar date "
        "(YYYY-MM-DD): " + excerpt[ordinal]
    )
    return reasons


def identifiers(frame: pd.DataFrame, column: str) -> pd.Series:
    """Return an ID column as stripped strings in Unicode NFKC form.

    NFKC turns full-width letters and digits (Ｍ００１２３) into ASCII (M00123), as
    Japanese input methods and shop systems mix both widths, so one member or product
    keeps one ID across sources. Leading zeros stay.
    """
    values = text(frame, column)
    # IDs repeat across a partition's rows, so each distinct value is normalized once.
    codes, distinct = pd.factorize(values)
    normalized = [unicodedata.normalize("NFKC", value).strip() for value in distinct]
    return pd.Series(np.asarray(normalized + [""], dtype=object)[codes], index=values.index)


def parse_integers(values: pd.Series, field: str) -> tuple[pd.Series, pd.Series]:
    """Parse whole numbers written with ASCII digits only; return (Int64 values, reasons)."""
    values = values.fillna("").astype(str).str.strip()
    well_formed = values.str.match(_INTEGER).astype(bool)
    numbers = pd.Series(pd.NA, index=values.index, dtype="Int64")
    reasons = pd.Series(None, index=values.index, dtype=object)
    digits = values.str.lstrip("+-").str.lstrip("0").str.len()
    # Up to 18 digits always fits in int64; only longer values need an exact check.
    short = well_formed & (digits <= 18)
    numbers[short] = values[short].astype("int64")
    long_values = values[well_formed & ~short]
    fits = long_values.map(lambda value: abs(int(value)) <= _INT64_MAX).astype(bool)
    numbers[fits[fits].index] = [int(value) for value in long_values[fits]]
    reasons[fits[~fits].index] = f"{field} is out of range"
    bad_form = ~well_formed & (values != "")
    reasons[bad_form] = f"{field} is not a whole number in ASCII digits: " + values[
        bad_form
    ].str.slice(0, 40)
    return numbers, reasons


def parse_booleans(values: pd.Series, field: str) -> tuple[pd.Series, pd.Series]:
    lowered = values.fillna("").astype(str).str.strip().str.lower()
    result = pd.Series(pd.NA, index=values.index, dtype="boolean")
    result[lowered.isin(_TRUE)] = True
    result[lowered.isin(_FALSE)] = False
    reasons = pd.Series(None, index=values.index, dtype=object)
    invalid = (lowered != "") & result.isna()
    reasons[invalid] = f"{field} is not true or false"
    return result, reasons


def invalid_broadcast_id_reason(broadcast_id: str) -> str | None:
    if BROADCAST_ID.match(broadcast_id):
        return None
    return f"broadcast_id {broadcast_id[:80]!r} is invalid: use 1 to 64 letters, digits, '-' or '_'"


_WEB_URL = re.compile(r"^https?://[^\s/?#]+[^\s]*$", re.IGNORECASE)


def url_reasons(values: pd.Series, field: str) -> pd.Series:
    """Return a reason for each value that is neither empty nor an http(s) URL.

    URLs end up in messages to members, so a `javascript:` or `file:` link is rejected.
    """
    values = values.fillna("").astype(str).str.strip()
    invalid = (values != "") & ~values.str.match(_WEB_URL).astype(bool)
    reasons = pd.Series(None, index=values.index, dtype=object)
    reasons[invalid] = f"{field} is not an http or https URL: " + values[invalid].str.slice(0, 40)
    return reasons
