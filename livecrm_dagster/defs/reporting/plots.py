"""Charts of one broadcast for its KPI report, rendered to PNG with matplotlib's Agg backend.

- Concurrent viewers: the number of members with an open viewing session at each whole
  minute from the broadcast's start to its end, both included. A session is open from
  its `started_at` to its `ended_at`, both included. Product clicks and purchases during
  the live are marked on the time axis.
- Viewing rate by tier: a histogram of the viewing members' viewing rates in 10% bins,
  stacked by tier (hot, mid, low or buyer, as the follow-up audience assigns them).

The figures are drawn on an Agg canvas without pyplot, so rendering changes no global
matplotlib state and needs no display.
"""

from __future__ import annotations

import base64
import io
from zoneinfo import ZoneInfo

import matplotlib.dates as mdates
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

TIERS = ("hot", "mid", "low", "buyer")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Images are embedded in the run's event log as base64, so each one is kept small.
MAX_PNG_BYTES = 150_000
_RENDER_DPIS = (100, 72)
_MINUTE = pd.Timedelta(minutes=1)
_TIER_COLORS = {"hot": "#d62728", "mid": "#ff7f0e", "low": "#7f7f7f", "buyer": "#2ca02c"}


def concurrent_viewers(
    sessions: pd.DataFrame, starts_at: pd.Timestamp, ends_at: pd.Timestamp
) -> pd.Series:
    """Count the members with an open session at each minute of the broadcast.

    `sessions` has `member_id`, `started_at` and `ended_at` (zone-aware). A member with
    several sessions open at one minute counts once. Returns int64 counts indexed by the
    minute marks in UTC.
    """
    length = ends_at - starts_at
    if length <= pd.Timedelta(0):
        raise ValueError(f"broadcast length must be positive, got {length}")
    marks = int(length // _MINUTE) + 1
    index = pd.date_range(starts_at, periods=marks, freq=_MINUTE).tz_convert("UTC")
    counts = np.zeros(marks, dtype=np.int64)
    if sessions.empty:
        return pd.Series(counts, index=index, name="members")

    # The minute marks a session covers: the first mark at or after its start up to the
    # last mark at or before its end.
    first = _ceil_minutes(sessions["started_at"] - starts_at).clip(lower=0)
    last = ((sessions["ended_at"] - starts_at) // _MINUTE).clip(upper=marks - 1)
    covered = pd.DataFrame(
        {"member_id": sessions["member_id"].to_numpy(), "first": first, "last": last}
    )
    covered = covered.loc[covered["first"] <= covered["last"]]
    merged = _merge_member_ranges(covered)

    # Each member's ranges are now disjoint, so a difference array counts members.
    np.add.at(counts, merged["first"].to_numpy(), 1)
    ends = merged["last"].to_numpy() + 1
    np.subtract.at(counts, ends[ends < marks], 1)
    return pd.Series(np.cumsum(counts), index=index, name="members")


def _ceil_minutes(offsets: pd.Series) -> pd.Series:
    return -((-offsets) // _MINUTE)


def _merge_member_ranges(covered: pd.DataFrame) -> pd.DataFrame:
    """Merge each member's overlapping ranges of minute marks into disjoint ranges."""
    if covered.empty:
        return covered
    covered = covered.sort_values(["member_id", "first"], kind="stable")
    latest_last = covered.groupby("member_id")["last"].cummax()
    previous_last = latest_last.groupby(covered["member_id"]).shift()
    starts_range = previous_last.isna() | (covered["first"] > previous_last)
    range_no = starts_range.cumsum()
    return covered.groupby(range_no).agg(first=("first", "min"), last=("last", "max"))


def product_click_times(
    events: pd.DataFrame, starts_at: pd.Timestamp, ends_at: pd.Timestamp
) -> pd.Series:
    """Select the times of product clicks inside [start, end], by members and anonymous viewers."""
    clicks = events.loc[events["type"] == "product_click", "occurred_at"]
    return clicks.loc[(clicks >= starts_at) & (clicks <= ends_at)].sort_values()


def purchase_times(attribution: pd.DataFrame) -> pd.Series:
    """Select the paid_at of the orders this broadcast counts as bought during the live.

    Those are the orders behind the KPIs' revenue: counted, during the live and with a
    positive net amount.
    """
    counted = (
        attribution["counted"].astype(bool)
        & attribution["during_live"].astype(bool)
        & (attribution["net_amount"] > 0)
    )
    return attribution.loc[counted, "paid_at"].sort_values()


def member_tiers(audience: pd.DataFrame) -> pd.Series:
    """Map each member of a follow-up audience to one tier: buyer, else hot, mid or low.

    The segment rules put every viewing member in exactly one of these four segments, and
    the buyer check wins should an audience list a member twice.
    """
    tiered = audience.loc[audience["segment"].isin(TIERS), ["member_id", "segment"]]
    rank = tiered["segment"].map({"buyer": 0, "hot": 1, "mid": 2, "low": 3})
    tiered = tiered.assign(rank=rank).sort_values(["member_id", "rank"])
    first = tiered.drop_duplicates("member_id")
    return first.set_index("member_id")["segment"].rename("tier")


def viewing_rate_histogram(
    summary: pd.DataFrame, audience: pd.DataFrame, bins: int = 10
) -> pd.DataFrame:
    """Count viewing members per viewing-rate bin and tier.

    Bin k contains rates in [k / bins, (k + 1) / bins), and the last bin also contains 1.0.
    Members of `summary` without a tier in `audience` are left out. Returns int64 counts
    with one row per bin, labelled like "40-50%", and one column per tier.
    """
    tiers = member_tiers(audience)
    members = summary[["member_id", "viewing_rate"]].merge(
        tiers, left_on="member_id", right_index=True, how="inner"
    )
    # Rounding first keeps a rate such as 0.7 (stored as 0.69999...) in the 70-80% bin.
    scaled = np.round(members["viewing_rate"].astype("float64").to_numpy() * bins, 9)
    bin_no = np.clip(np.floor(scaled), 0, bins - 1).astype(np.int64)
    labels = [f"{100 * k // bins}-{100 * (k + 1) // bins}%" for k in range(bins)]
    counts = pd.crosstab(
        pd.Categorical.from_codes(bin_no, categories=labels),
        pd.Categorical(members["tier"], categories=list(TIERS)),
        dropna=False,
    )
    counts = counts.reindex(index=labels, columns=list(TIERS), fill_value=0).astype("int64")
    counts.index.name = "viewing_rate"
    counts.columns.name = "tier"
    return counts


def render_concurrent_viewers(
    viewers: pd.Series,
    click_times: pd.Series,
    purchase_times: pd.Series,
    zone: ZoneInfo,
    title: str,
) -> bytes:
    """Draw concurrent viewers over time with clicks and purchases as ticks; return PNG bytes."""
    figure = Figure(figsize=(8, 3.6))
    axes = figure.add_subplot()
    times = viewers.index.tz_convert(zone)
    axes.step(times, viewers.to_numpy(), where="post", color="#1f77b4", label="members watching")
    axes.set_ylim(bottom=0, top=max(1, int(viewers.max()) if len(viewers) else 1) * 1.15)
    # Ticks sit in a band at the bottom of the plot: x in data, y in axes coordinates.
    band = axes.get_xaxis_transform()
    for instants, height, marker, size, color, label in (
        (click_times, 0.03, "|", 10, "#9467bd", "product clicks"),
        (purchase_times, 0.09, "^", 7, "#2ca02c", "purchases during the live"),
    ):
        axes.plot(
            instants.dt.tz_convert(zone),
            np.full(len(instants), height),
            linestyle="none",
            marker=marker,
            markersize=size,
            color=color,
            transform=band,
            clip_on=False,
            label=f"{label} ({len(instants)})",
        )
    axes.set_xlim(times[0], times[-1])
    axes.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=zone))
    axes.set_xlabel(f"shop time ({zone.key})")
    axes.set_ylabel("members with an open session")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right", fontsize=8)
    return _png(figure)


def render_viewing_rate_histogram(histogram: pd.DataFrame, title: str) -> bytes:
    """Draw the viewing-rate histogram stacked by tier; return PNG bytes."""
    figure = Figure(figsize=(8, 3.6))
    axes = figure.add_subplot()
    positions = np.arange(len(histogram))
    bottom = np.zeros(len(histogram), dtype=np.int64)
    for tier in histogram.columns:
        values = histogram[tier].to_numpy()
        axes.bar(
            positions,
            values,
            bottom=bottom,
            color=_TIER_COLORS.get(tier),
            label=f"{tier} ({int(values.sum())})",
        )
        bottom = bottom + values
    axes.set_xticks(positions, histogram.index, fontsize=8)
    axes.set_xlabel("viewing rate")
    axes.set_ylabel("viewing members")
    axes.yaxis.get_major_locator().set_params(integer=True)
    axes.margins(y=0.15)
    axes.set_title(title, fontsize=10)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="upper left", fontsize=8)
    return _png(figure)


def _png(figure: Figure) -> bytes:
    """Render at the highest DPI in `_RENDER_DPIS` whose PNG fits in MAX_PNG_BYTES."""
    FigureCanvasAgg(figure)
    figure.tight_layout()
    png = b""
    for dpi in _RENDER_DPIS:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
        png = buffer.getvalue()
        if len(png) <= MAX_PNG_BYTES:
            break
    return png


def markdown_image(png: bytes, alt_text: str) -> str:
    """Return a Markdown image with the PNG inlined as a base64 data URI."""
    encoded = base64.b64encode(png).decode("ascii")
    return f"![{alt_text}](data:image/png;base64,{encoded})"


def broadcast_charts(
    sessions: pd.DataFrame,
    events: pd.DataFrame,
    attribution: pd.DataFrame,
    summary: pd.DataFrame,
    audience: pd.DataFrame,
    starts_at: pd.Timestamp,
    ends_at: pd.Timestamp,
    zone: ZoneInfo,
) -> tuple[bytes, bytes, int]:
    """Render both charts of a broadcast; return their PNGs and the peak concurrent members.

    `events` needs `type` and `occurred_at` of the broadcast's product clicks at least.
    """
    viewers = concurrent_viewers(sessions, starts_at, ends_at)
    day = starts_at.tz_convert(zone).strftime("%Y-%m-%d")
    timeline = render_concurrent_viewers(
        viewers,
        product_click_times(events, starts_at, ends_at),
        purchase_times(attribution),
        zone,
        f"Members watching, {day} (peak {int(viewers.max())})",
    )
    histogram = render_viewing_rate_histogram(
        viewing_rate_histogram(summary, audience),
        f"Viewing rate of {len(summary)} viewing members by tier",
    )
    return timeline, histogram, int(viewers.max())
