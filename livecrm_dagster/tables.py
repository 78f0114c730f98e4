"""Column lists and primary keys of every warehouse table.

Per-broadcast tables start with `broadcast_id`; a write replaces one broadcast's rows.
Their primary keys start with it too, so deleting a broadcast's rows uses the key's index.
Money columns are 64-bit integers in the currency's smallest unit.
"""

from __future__ import annotations

TIME = "time"
TEXT = "text"
INT = "int"
FLOAT = "float"
BOOL = "bool"

Schema = tuple[list[tuple[str, str]], tuple[str, ...]]

# Tables kept as one Parquet file per broadcast (see event_files.py) instead of in SQL;
# the warehouse reads and replaces them by broadcast like the others.
FILE_TABLES = frozenset({"raw_viewer_events"})

# Tables with tens of thousands of rows per broadcast, always replaced one broadcast at a
# time. On PostgreSQL each broadcast's rows sit in a partition of their own (see
# broadcast_partitions.py).
PARTITIONED_BY_BROADCAST = frozenset(
    {"viewing_sessions", "viewer_summary", "order_attribution", "followup_audience", "raw_orders"}
)

SCHEMAS: dict[str, Schema] = {
    "broadcasts": (
        [
            ("broadcast_id", TEXT),
            ("title", TEXT),
            ("starts_at", TIME),
            ("ends_at", TIME),
            ("featured_product_ids", TEXT),
            ("archive_url", TEXT),
            ("next_broadcast_id", TEXT),
            ("next_broadcast_at", TIME),
            ("ad_spend", INT),
        ],
        ("broadcast_id",),
    ),
    "quarantine": (
        [
            ("scope", TEXT),
            ("input", TEXT),
            ("file", TEXT),
            ("line", INT),
            ("record_key", TEXT),
            ("field", TEXT),
            ("reason", TEXT),
        ],
        ("scope", "input", "file", "line", "record_key"),
    ),
    "members": (
        [
            ("member_id", TEXT),
            ("birth_date", TEXT),
            ("age", INT),
            ("gender", TEXT),
            ("email", TEXT),
            ("line_user_id", TEXT),
            ("consent_email", BOOL),
            ("consent_line", BOOL),
            ("consent_webhook", BOOL),
            ("unsubscribed_at", TIME),
        ],
        ("member_id",),
    ),
    "products": (
        [
            ("product_id", TEXT),
            ("name", TEXT),
            ("category", TEXT),
            ("stock", INT),
            ("low_stock_threshold", INT),
            ("detail_url", TEXT),
            ("reviews_url", TEXT),
            ("trial_product_id", TEXT),
        ],
        ("product_id",),
    ),
    "orders": (
        [
            ("order_id", TEXT),
            ("line_no", INT),
            ("member_id", TEXT),
            ("ordered_at", TIME),
            ("paid_at", TIME),
            ("status", TEXT),
            ("product_id", TEXT),
            ("quantity", INT),
            ("unit_price", INT),
            ("refund_of", TEXT),
        ],
        ("order_id", "line_no"),
    ),
    "raw_viewer_events": (
        [
            ("broadcast_id", TEXT),
            ("event_id", TEXT),
            ("member_id", TEXT),
            ("device_id", TEXT),
            ("type", TEXT),
            ("occurred_at", TIME),
            ("product_id", TEXT),
            ("question_id", TEXT),
            ("answer", TEXT),
            ("is_correct", BOOL),
            ("coupon_code", TEXT),
            ("text", TEXT),
        ],
        ("broadcast_id", "event_id"),
    ),
    "raw_orders": (
        [
            ("broadcast_id", TEXT),
            ("order_id", TEXT),
            ("line_no", INT),
            ("member_id", TEXT),
            ("ordered_at", TIME),
            ("paid_at", TIME),
            ("status", TEXT),
            ("product_id", TEXT),
            ("quantity", INT),
            ("unit_price", INT),
            ("refund_of", TEXT),
            ("refunded_quantity", INT),
            ("net_quantity", INT),
            ("net_amount", INT),
        ],
        ("broadcast_id", "order_id", "line_no"),
    ),
    "viewing_sessions": (
        [
            ("broadcast_id", TEXT),
            ("member_id", TEXT),
            ("session_no", INT),
            ("started_at", TIME),
            ("ended_at", TIME),
            ("watched_seconds", FLOAT),
            ("events", INT),
            ("events_inside", INT),
            ("devices", INT),
        ],
        ("broadcast_id", "member_id", "session_no"),
    ),
    "order_attribution": (
        [
            ("broadcast_id", TEXT),
            ("order_id", TEXT),
            ("member_id", TEXT),
            ("paid_at", TIME),
            ("status", TEXT),
            ("gross_amount", INT),
            ("net_amount", INT),
            ("net_items", INT),
            ("product_ids", TEXT),
            ("during_live", BOOL),
            ("post_live", BOOL),
            ("same_night", BOOL),
            ("clicked_then_bought", BOOL),
            ("claimed_by", TEXT),
            ("counted", BOOL),
        ],
        ("broadcast_id", "order_id"),
    ),
    "viewer_summary": (
        [
            ("broadcast_id", TEXT),
            ("member_id", TEXT),
            ("age_band", TEXT),
            ("gender", TEXT),
            ("first_seen_at", TIME),
            ("last_seen_at", TIME),
            ("watched_seconds", FLOAT),
            ("viewing_rate", FLOAT),
            ("sessions", INT),
            ("chats", INT),
            ("likes", INT),
            ("clicks", INT),
            ("clicked_product_ids", TEXT),
            ("answers", TEXT),
            ("correct_answers", INT),
            ("coupon_claimed", BOOL),
            ("bought_during_live", BOOL),
            ("amount", INT),
            ("items", INT),
            ("products_bought", TEXT),
            ("paid_at", TIME),
            ("post_live_amount", INT),
        ],
        ("broadcast_id", "member_id"),
    ),
    "broadcast_kpis": (
        [
            ("broadcast_id", TEXT),
            ("currency", TEXT),
            ("viewing_members", INT),
            ("anonymous_viewers", INT),
            ("buyers_during_live", INT),
            ("cvr", FLOAT),
            ("orders_during_live", INT),
            ("revenue_during_live", INT),
            ("average_order_value", FLOAT),
            ("non_buyers", INT),
            ("average_viewing_rate", FLOAT),
            ("average_watched_seconds", FLOAT),
            ("chats", INT),
            ("likes", INT),
            ("clicks", INT),
            ("post_live_buyers", INT),
            ("post_live_revenue", INT),
            ("same_night_revenue", INT),
            ("clicked_then_bought_revenue", INT),
        ],
        ("broadcast_id",),
    ),
    "followup_audience": (
        [
            ("broadcast_id", TEXT),
            ("segment", TEXT),
            ("member_id", TEXT),
            ("viewing_rate", FLOAT),
            ("watched_seconds", FLOAT),
            ("chats", INT),
            ("product_ids", TEXT),
            ("question_id", TEXT),
            ("answer", TEXT),
        ],
        ("broadcast_id", "segment", "member_id", "question_id"),
    ),
    "quality_checks": (
        [
            ("broadcast_id", TEXT),
            ("asset", TEXT),
            ("check_name", TEXT),
            ("passed", BOOL),
            ("description", TEXT),
        ],
        ("broadcast_id", "asset", "check_name"),
    ),
    "followup_lift": (
        [
            ("broadcast_id", TEXT),
            ("step_id", TEXT),
            ("sent_members", INT),
            ("sent_conversions", INT),
            ("sent_conversion_rate", FLOAT),
            ("holdout_members", INT),
            ("holdout_conversions", INT),
            ("holdout_conversion_rate", FLOAT),
            ("lift_points", FLOAT),
            ("window_days", FLOAT),
            ("window_closes_at", TIME),
        ],
        ("broadcast_id", "step_id"),
    ),
}
