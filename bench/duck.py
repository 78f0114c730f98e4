"""An independent DuckDB SQL implementation of sessions and the viewer summary's viewing columns.

It follows the written definitions, not the pandas code: a gap longer than the timeout
cuts a device's session, a `view_end` from a known device closes its session, a
member's device sessions that overlap or touch are merged by interval union, watched
seconds are clipped to [start, end], a viewing member has at least one viewing event
inside [start, end], and a member's session count includes only sessions that touch the
broadcast. Rows keep the events' order (occurred_at, then event_id) for ties.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd

_SESSIONS_SQL = """
WITH viewing AS (
    SELECT member_id, device_id, type, occurred_at, event_id
    FROM events
    WHERE type IN ('view_start', 'heartbeat', 'view_end') AND member_id <> ''
),
marked AS (
    SELECT *,
        CASE
            WHEN lag(occurred_at) OVER device_order IS NULL THEN 1
            WHEN epoch_us(occurred_at) - epoch_us(lag(occurred_at) OVER device_order)
                > $timeout_us THEN 1
            WHEN lag(type) OVER device_order = 'view_end' AND device_id <> '' THEN 1
            ELSE 0
        END AS starts_new
    FROM viewing
    WINDOW device_order AS (PARTITION BY member_id, device_id ORDER BY occurred_at, event_id)
),
numbered AS (
    SELECT *, sum(starts_new) OVER (
        PARTITION BY member_id, device_id ORDER BY occurred_at, event_id
        ROWS UNBOUNDED PRECEDING
    ) AS device_session
    FROM marked
),
device_sessions AS (
    SELECT member_id, device_id, device_session,
        min(occurred_at) AS started_at,
        max(occurred_at) AS ended_at,
        count(*) AS events,
        count(*) FILTER (WHERE occurred_at BETWEEN $starts_at AND $ends_at) AS events_inside
    FROM numbered
    GROUP BY member_id, device_id, device_session
),
merge_marked AS (
    SELECT *,
        CASE WHEN started_at > coalesce(max(ended_at) OVER (
            PARTITION BY member_id ORDER BY started_at, device_id, device_session
            ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING
        ), started_at - INTERVAL 1 MICROSECOND) THEN 1 ELSE 0 END AS starts_new
    FROM device_sessions
),
merge_numbered AS (
    SELECT *, sum(starts_new) OVER (
        PARTITION BY member_id ORDER BY started_at, device_id, device_session
        ROWS UNBOUNDED PRECEDING
    ) AS merged
    FROM merge_marked
)
SELECT member_id,
    CAST(row_number() OVER (PARTITION BY member_id ORDER BY min(started_at)) AS BIGINT)
        AS session_no,
    min(started_at) AS started_at,
    max(ended_at) AS ended_at,
    greatest(
        epoch_us(least(max(ended_at), $ends_at)) - epoch_us(greatest(min(started_at), $starts_at)),
        0
    ) AS watched_us,
    CAST(sum(events) AS BIGINT) AS events,
    CAST(sum(events_inside) AS BIGINT) AS events_inside,
    CAST(count(DISTINCT device_id) AS BIGINT) AS devices
FROM merge_numbered
GROUP BY member_id, merged
ORDER BY member_id, started_at
"""

_MEMBERS_SQL = """
WITH per_member AS (
    SELECT member_id, sum(watched_us) AS watched_us,
        count(*) FILTER (WHERE events_inside > 0 OR watched_us > 0) AS sessions
    FROM sessions
    GROUP BY member_id
    HAVING sum(events_inside) > 0
),
activity AS (
    SELECT member_id,
        min(occurred_at) AS first_seen_at,
        max(occurred_at) AS last_seen_at,
        count(*) FILTER (WHERE type = 'chat') AS chats,
        count(*) FILTER (WHERE type = 'like') AS likes,
        count(*) FILTER (WHERE type = 'product_click') AS clicks
    FROM events
    WHERE member_id IN (SELECT member_id FROM per_member)
    GROUP BY member_id
)
SELECT p.member_id,
    CAST(p.watched_us AS BIGINT) AS watched_us,
    least(greatest(p.watched_us / 1e6 / $length_seconds, 0.0), 1.0) AS viewing_rate,
    CAST(p.sessions AS BIGINT) AS sessions,
    a.first_seen_at, a.last_seen_at,
    CAST(a.chats AS BIGINT) AS chats,
    CAST(a.likes AS BIGINT) AS likes,
    CAST(a.clicks AS BIGINT) AS clicks
FROM per_member p JOIN activity a USING (member_id)
ORDER BY p.member_id
"""


def sessions_and_members(
    events_file: Path,
    starts_at: pd.Timestamp,
    ends_at: pd.Timestamp,
    timeout_seconds: float,
    threads: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (sessions, viewing members) computed by DuckDB from a partition's event file.

    Watched time comes back as whole microseconds (`watched_us`), the resolution of the
    stored instants, so the comparison with the pandas result needs no float tolerance.
    """
    connection = duckdb.connect()
    if threads:
        connection.execute(f"SET threads = {int(threads)}")
    quoted = str(events_file).replace("'", "''")
    connection.execute(
        "CREATE VIEW events AS SELECT event_id, member_id, device_id, type, occurred_at "
        f"FROM read_parquet('{quoted}')"
    )
    parameters = {
        "timeout_us": int(round(timeout_seconds * 1_000_000)),
        "starts_at": starts_at.to_pydatetime(),
        "ends_at": ends_at.to_pydatetime(),
    }
    sessions = connection.sql(_SESSIONS_SQL, params=parameters).to_arrow_table()
    connection.register("sessions", sessions)
    length = (ends_at - starts_at).total_seconds()
    members = connection.sql(_MEMBERS_SQL, params={"length_seconds": length}).to_arrow_table()
    connection.close()
    return sessions.to_pandas(), members.to_pandas()
