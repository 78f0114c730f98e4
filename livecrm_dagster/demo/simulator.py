"""Simulate lunchtime live broadcasts and their viewer events around a real order log.

No public per-member live-viewing log exists, so the viewing side of the demo is drawn
from published aggregate figures. docs/demo-data.md names the source of each figure.
Real buyers are tied to the simulation: a member who paid during a broadcast may be
cast as a viewer whose session covers the payment, with a product click shortly before.

Every broadcast gets its own generator, seeded from the base seed and the broadcast ID,
so one broadcast can be simulated again without the others and gives the same events.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd

from livecrm_dagster.defs.ingestion.contract import EVENT_TYPES
from livecrm_dagster.demo.uci_online_retail import NON_PRODUCT_CATEGORY, is_non_product_code

LONDON = ZoneInfo("Europe/London")
BROADCAST_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
SHOP_URL = "https://shop.example"
SHOW_START = time(12, 0)
SHOW_SECONDS = 3600.0
DAY_SECONDS = 86_400.0
FEATURED_PER_BROADCAST = 4
# plan_broadcasts picks each broadcast day among this many busiest days of its period.
CANDIDATE_DAYS = 3
_PLAN_STREAM = 3

EVENT_COLUMNS = [
    "event_id",
    "broadcast_id",
    "member_id",
    "device_id",
    "type",
    "occurred_at",
    "product_id",
    "question_id",
    "answer",
    "is_correct",
    "coupon_code",
    "text",
]

# Seconds after the start at which the host shows each featured product, poses the
# survey and the quiz question, and shows the coupon.
REVEAL_SECONDS = (180.0, 900.0, 1620.0, 2340.0)
SURVEY_SECONDS = 600.0
QUIZ_SECONDS = 1800.0
COUPON_SECONDS = 3000.0

SURVEY_QUESTION = "shopping_for"
SURVEY_ANSWERS = ("christmas", "home-decor", "kitchen", "gifts", "candles-and-lights")
QUIZ_QUESTION = "quiz_featured_price"
QUIZ_ANSWERS = ("a", "b", "c", "d")
CHAT_TEXTS = (
    "Hello everyone!",
    "Love this one",
    "How big is it?",
    "Does it come in other colours?",
    "Is it back in stock soon?",
    "Perfect for Christmas",
    "Can you show the back?",
    "What a price",
    "Just ordered two",
    "Thank you, see you next week!",
)


@dataclass(frozen=True)
class ViewingParameters:
    """Parameters of the viewing simulation, with times in seconds.

    docs/demo-data.md gives the published basis of each default, where one exists.
    """

    member_viewers: tuple[int, int] = (250, 400)
    anonymous_share: float = 0.30
    during_buyer_joins: float = 0.70
    after_buyer_joins: float = 0.30
    early_join_share: float = 0.20
    early_join_seconds: float = 300.0
    uniform_join_share: float = 0.10
    join_decay_mean: float = 600.0
    bounce_share: float = 0.30
    bounce_mean: float = 60.0
    watch_median: float = 480.0
    watch_sigma: float = 1.1
    linger_after_end: float = 180.0
    stay_to_end_share: float = 0.20
    reentries_mean: float = 0.5
    heartbeat_seconds: float = 10.0
    heartbeat_jitter: float = 1.0
    heartbeat_loss: float = 0.015
    view_end_loss: float = 0.35
    second_device_share: float = 0.03
    engagement_beta: tuple[float, float] = (0.5, 5.0)
    chat_share: float = 0.08
    chat_messages_mean: float = 3.0
    like_share: float = 0.12
    click_share: float = 0.15
    featured_click_share: float = 0.70
    answer_share: float = 0.25
    quiz_correct_share: float = 0.60
    coupon_share: float = 0.30
    duplicate_share: float = 0.005
    click_lag_median: float = 240.0
    click_lag_sigma: float = 0.6

    @property
    def mean_propensity(self) -> float:
        a, b = self.engagement_beta
        return a / (a + b)


DEFAULT_PARAMETERS = ViewingParameters()


def broadcast_generator(seed: int, broadcast_id: str) -> np.random.Generator:
    """Return a generator that depends only on the base seed and the broadcast ID."""
    # Python's hash() of a string changes between processes, so a digest is used.
    digest = hashlib.sha256(broadcast_id.encode("utf-8")).digest()
    key = int.from_bytes(digest[:16], "big")
    return np.random.default_rng(np.random.SeedSequence([seed, key]))


def format_london_times(epoch_ms: np.ndarray) -> np.ndarray:
    """Format UTC epoch milliseconds as ISO 8601 London times with their offset."""
    utc = pd.DatetimeIndex(pd.to_datetime(epoch_ms, unit="ms", utc=True))
    local = utc.tz_convert(LONDON).tz_localize(None)
    offset_minutes = (local - utc.tz_localize(None)) // pd.Timedelta(minutes=1)
    text = np.datetime_as_string(local.to_numpy().astype("datetime64[ms]"), unit="ms")
    offsets = np.array([_offset_text(int(minutes)) for minutes in offset_minutes])
    return np.char.add(text.astype(str), offsets)


def _offset_text(minutes: int) -> str:
    sign = "+" if minutes >= 0 else "-"
    hours, rest = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{rest:02d}"


def london_iso(moment: datetime) -> str:
    """Format a naive London time or an aware time as ISO 8601 with its London offset."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=LONDON)
    return moment.astimezone(LONDON).isoformat()


# --- Broadcast plan ---------------------------------------------------------------------


def plan_broadcasts(orders: pd.DataFrame, count: int, seed: int) -> pd.DataFrame:
    """Place ``count`` lunchtime broadcasts on busy weekdays spread over the order log.

    The weekdays of the log are cut into ``count`` periods with equal numbers of
    trading days. In each period the broadcast day is drawn from the three days with
    the most paid member orders. Only days with orders between 12:00 and 13:00 qualify,
    and not the last day of the log, whose next 24 hours are missing. Each broadcast runs
    12:00-13:00 London time and features the four products with the most orders in its
    calendar week.
    """
    sales = paid_product_sales(orders)
    days = _candidate_days(sales)
    if count < 1 or count > len(days):
        raise ValueError(
            f"invalid broadcast count {count}: the order log has {len(days)} qualifying days"
        )

    rng = np.random.default_rng(np.random.SeedSequence([seed, _PLAN_STREAM]))
    chosen = []
    for period in np.array_split(days.index.to_numpy(), count):
        busiest = days.loc[period].sort_values(ascending=False, kind="stable").head(CANDIDATE_DAYS)
        chosen.append(busiest.index[rng.integers(len(busiest))])

    rows = [_broadcast_row(day, sales) for day in sorted(chosen)]
    return _chain_broadcasts(pd.DataFrame(rows))


def paid_product_sales(orders: pd.DataFrame) -> pd.DataFrame:
    """Return the paid member order lines of real products with their London paid time."""
    is_paid = (orders["status"] == "paid") & (orders["member_id"] != "")
    is_product = ~is_non_product_code(orders["product_id"])
    has_units = orders["quantity"].str.fullmatch(r"[1-9]\d*")
    sales = orders.loc[is_paid & is_product & has_units, ["order_id", "member_id", "product_id"]]
    return sales.assign(paid=parse_london_times(orders.loc[sales.index, "paid_at"]))


def parse_london_times(values: pd.Series) -> pd.Series:
    """Parse ISO times to naive London times, reading zone-less values as London time."""
    parsed = pd.to_datetime(values, format="ISO8601")
    if parsed.dt.tz is None:
        return parsed
    return parsed.dt.tz_convert(LONDON).dt.tz_localize(None)


def _candidate_days(sales: pd.DataFrame) -> pd.Series:
    day = sales["paid"].dt.normalize()
    orders_per_day = sales.groupby(day)["order_id"].nunique()
    show_end = day + pd.Timedelta(hours=13)
    lunchtime = sales[(sales["paid"].dt.hour == 12) | (sales["paid"] == show_end)]
    has_lunch_orders = orders_per_day.index.isin(lunchtime["paid"].dt.normalize())
    is_weekday = orders_per_day.index.day_of_week < 5
    # The day after must lie in the log, so that after-live buyers exist in the data.
    has_next_day = orders_per_day.index < sales["paid"].max().normalize()
    return orders_per_day[has_lunch_orders & is_weekday & has_next_day].sort_index()


def _broadcast_row(day: pd.Timestamp, sales: pd.DataFrame) -> dict[str, object]:
    broadcast_id = f"b-{day:%Y-%m-%d}-lunch"
    starts = datetime.combine(day.date(), SHOW_START)
    return {
        "broadcast_id": broadcast_id,
        "title": f"Lunchtime live: gift picks for {day.day} {day:%B %Y}",
        "starts_at": london_iso(starts),
        "ends_at": london_iso(starts + timedelta(seconds=SHOW_SECONDS)),
        "featured_product_ids": weekly_top_products(sales, day.date()),
        "archive_url": f"{SHOP_URL}/live/{broadcast_id}/archive",
    }


def weekly_top_products(sales: pd.DataFrame, day: date) -> list[str]:
    """Return the products with the most orders in the Monday-to-Sunday week of ``day``."""
    monday = pd.Timestamp(day - timedelta(days=day.weekday()))
    in_week = (sales["paid"] >= monday) & (sales["paid"] < monday + pd.Timedelta(days=7))
    counts = sales[in_week].groupby("product_id")["order_id"].nunique()
    # Sorting by ID first makes ties independent of the order of the log.
    ranked = counts.sort_index().sort_values(ascending=False, kind="stable")
    return ranked.index[:FEATURED_PER_BROADCAST].tolist()


def _chain_broadcasts(broadcasts: pd.DataFrame) -> pd.DataFrame:
    broadcasts["next_broadcast_id"] = broadcasts["broadcast_id"].shift(-1, fill_value="")
    broadcasts["next_broadcast_at"] = broadcasts["starts_at"].shift(-1, fill_value="")
    return broadcasts


# --- Viewers and their views ------------------------------------------------------------


@dataclass
class _Show:
    broadcast_id: str
    start_ms: int
    featured: list[str]

    @classmethod
    def from_broadcast(cls, broadcast: Mapping[str, object]) -> _Show:
        starts = datetime.fromisoformat(str(broadcast["starts_at"]))
        featured = broadcast["featured_product_ids"]
        if isinstance(featured, str):
            featured = [product for product in featured.split(";") if product]
        return cls(
            broadcast_id=str(broadcast["broadcast_id"]),
            start_ms=int(starts.astimezone(UTC).timestamp() * 1000),
            featured=list(featured),
        )


@dataclass
class _View:
    viewer: int
    device_id: str
    start: float
    end: float


@dataclass
class _Viewer:
    member_id: str
    device_id: str
    propensity: float
    # Seconds from the start: the first and last payment of a during-live buyer.
    paid_span: tuple[float, float] | None = None
    bought_products: list[str] = field(default_factory=list)
    is_after_buyer: bool = False
    click_at: float | None = None
    views: list[_View] = field(default_factory=list)


def find_window_buyers(orders: pd.DataFrame, start_ms: int) -> pd.DataFrame:
    """Return the members who paid for real products during the show or within 24 h after.

    One row per member with ``first_paid`` and ``last_paid`` in seconds from the start,
    the products bought and whether a payment fell inside the show (``during``).
    Payments after the show count only for members who paid nothing during it.
    """
    start = pd.Timestamp(start_ms, unit="ms", tz="UTC").tz_convert(LONDON)
    dates = {(start + pd.Timedelta(days=offset)).strftime("%Y-%m-%d") for offset in (-1, 0, 1, 2)}
    near = orders[orders["paid_at"].str[:10].isin(dates)]
    sales = paid_product_sales(near)
    paid_utc = sales["paid"].dt.tz_localize(LONDON).dt.tz_convert("UTC")
    seconds = (paid_utc - start.tz_convert("UTC")).dt.total_seconds()
    sales = sales.assign(seconds=seconds)
    sales = sales[(sales["seconds"] >= 0) & (sales["seconds"] <= SHOW_SECONDS + DAY_SECONDS)]

    during = sales[sales["seconds"] <= SHOW_SECONDS]
    after = sales[~sales["member_id"].isin(during["member_id"])]
    return pd.concat([_summarize_buyers(during, True), _summarize_buyers(after, False)])


def _summarize_buyers(sales: pd.DataFrame, during: bool) -> pd.DataFrame:
    grouped = sales.groupby("member_id", sort=True)
    summary = pd.DataFrame(
        {
            "first_paid": grouped["seconds"].min(),
            "last_paid": grouped["seconds"].max(),
            "products": grouped["product_id"].agg(lambda ids: sorted(set(ids))),
        }
    )
    return summary.assign(during=during).rename_axis("member_id").reset_index()


def _cast_viewers(
    rng: np.random.Generator,
    buyers: pd.DataFrame,
    members: pd.DataFrame,
    parameters: ViewingParameters,
) -> list[_Viewer]:
    viewers = []
    for buyer in buyers.itertuples(index=False):
        joins = parameters.during_buyer_joins if buyer.during else parameters.after_buyer_joins
        if rng.random() >= joins:
            continue
        viewer = _new_viewer(rng, buyer.member_id, parameters)
        viewer.bought_products = list(buyer.products)
        if buyer.during:
            viewer.paid_span = (buyer.first_paid, buyer.last_paid)
        else:
            viewer.is_after_buyer = True
        viewers.append(viewer)

    low, high = parameters.member_viewers
    target = int(rng.integers(low, high + 1))
    browsers = members.loc[~members["member_id"].isin(buyers["member_id"]), "member_id"]
    browser_count = min(max(target - len(viewers), 0), len(browsers))
    for member_id in rng.choice(browsers.to_numpy(dtype=str), size=browser_count, replace=False):
        viewers.append(_new_viewer(rng, str(member_id), parameters))

    share = parameters.anonymous_share
    anonymous_count = round(len(viewers) * share / (1 - share))
    viewers.extend(_new_viewer(rng, "", parameters) for _ in range(anonymous_count))
    return viewers


def _new_viewer(rng: np.random.Generator, member_id: str, parameters: ViewingParameters) -> _Viewer:
    return _Viewer(
        member_id=member_id,
        device_id=_new_device_id(rng),
        propensity=float(rng.beta(*parameters.engagement_beta)),
    )


def _new_device_id(rng: np.random.Generator) -> str:
    return f"d-{rng.bytes(6).hex()}"


def _plan_views(
    rng: np.random.Generator, viewers: list[_Viewer], parameters: ViewingParameters
) -> None:
    for index, viewer in enumerate(viewers):
        if viewer.paid_span is not None:
            first = _buyer_view(rng, index, viewer, parameters)
        else:
            first = _ordinary_view(rng, index, viewer, parameters, not viewer.is_after_buyer)
        viewer.views.append(first)
        _add_reentries(rng, index, viewer, parameters)
        if viewer.member_id:
            _add_second_devices(rng, viewer, parameters)


def _draw_arrival(rng: np.random.Generator, parameters: ViewingParameters) -> float:
    branch = rng.random()
    if branch < parameters.early_join_share:
        return -rng.uniform(0.0, parameters.early_join_seconds)
    if branch < parameters.early_join_share + parameters.uniform_join_share:
        return rng.uniform(0.0, SHOW_SECONDS)
    return min(rng.exponential(parameters.join_decay_mean), SHOW_SECONDS - 1.0)


def _draw_watch_seconds(
    rng: np.random.Generator, parameters: ViewingParameters, may_bounce: bool
) -> float:
    if may_bounce and rng.random() < parameters.bounce_share:
        return rng.exponential(parameters.bounce_mean)
    return rng.lognormal(np.log(parameters.watch_median), parameters.watch_sigma)


def _cut_at_show_end(rng: np.random.Generator, end: float, parameters: ViewingParameters) -> float:
    # Viewers still watching at the end leave within a few minutes of it.
    if end <= SHOW_SECONDS:
        return end
    return SHOW_SECONDS + rng.uniform(0.0, parameters.linger_after_end)


def _ordinary_view(
    rng: np.random.Generator,
    index: int,
    viewer: _Viewer,
    parameters: ViewingParameters,
    may_bounce: bool,
) -> _View:
    start = _draw_arrival(rng, parameters)
    # The lognormal watch time alone leaves under 10% of viewers at the end, far below
    # the 15-40% reported for online events, so a share stays until the end.
    if rng.random() < parameters.stay_to_end_share:
        end = SHOW_SECONDS + 1.0
    else:
        end = start + _draw_watch_seconds(rng, parameters, may_bounce)
    return _View(index, viewer.device_id, start, _cut_at_show_end(rng, end, parameters))


def _buyer_view(
    rng: np.random.Generator, index: int, viewer: _Viewer, parameters: ViewingParameters
) -> _View:
    """Open a view that starts before the buyer's click and lasts past the last payment."""
    first_paid, last_paid = viewer.paid_span
    earliest = -rng.uniform(0.0, parameters.early_join_seconds)
    click = first_paid - buyer_click_lag(rng, parameters)
    if click < earliest:
        # A viewer cannot click before joining, so an early payer clicks soon after joining.
        click = rng.uniform(earliest, first_paid - 10.0)
    start = max(click - rng.uniform(30.0, 600.0), earliest - rng.uniform(5.0, 60.0))
    end = last_paid + rng.uniform(60.0, 900.0)
    if end > SHOW_SECONDS:
        end = max(_cut_at_show_end(rng, end, parameters), last_paid + 60.0)
    viewer.click_at = click
    return _View(index, viewer.device_id, start, end)


def buyer_click_lag(rng: np.random.Generator, parameters: ViewingParameters) -> float:
    """Draw the seconds between a buyer's product click and the payment."""
    lag = rng.lognormal(np.log(parameters.click_lag_median), parameters.click_lag_sigma)
    return float(np.clip(lag, 20.0, 1200.0))


def _add_reentries(
    rng: np.random.Generator, index: int, viewer: _Viewer, parameters: ViewingParameters
) -> None:
    for _ in range(min(rng.poisson(parameters.reentries_mean), 3)):
        previous_end = viewer.views[-1].end
        # Some viewers come back for the quiz or the coupon.
        moments = [m for m in (QUIZ_SECONDS, COUPON_SECONDS) if m > previous_end + 120.0]
        if moments and rng.random() < 0.5:
            start = moments[0] - rng.uniform(0.0, 90.0)
        else:
            start = previous_end + 5.0 + rng.exponential(300.0)
        if start >= SHOW_SECONDS:
            return
        end = _cut_at_show_end(rng, start + _draw_watch_seconds(rng, parameters, True), parameters)
        viewer.views.append(_View(index, viewer.device_id, start, end))


def _add_second_devices(
    rng: np.random.Generator, viewer: _Viewer, parameters: ViewingParameters
) -> None:
    for view in list(viewer.views):
        if rng.random() >= parameters.second_device_share:
            continue
        overlap = rng.uniform(0.3, 1.0)
        length = view.end - view.start
        start = view.start + (1.0 - overlap) * length
        # The copy may run past the original but not beyond the lingering after the show.
        end = min(start + length, max(view.end, SHOW_SECONDS + parameters.linger_after_end))
        viewer.views.append(_View(view.viewer, _new_device_id(rng), start, end))


# --- Events -----------------------------------------------------------------------------


class _EventLog:
    """Columns of the events drawn so far, with times in seconds from the start."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.viewer: list[int] = []
        self.device_id: list[str] = []
        self.type: list[str] = []
        self.product_id: list[str] = []
        self.question_id: list[str] = []
        self.answer: list[str] = []
        self.is_correct: list[bool | None] = []
        self.coupon_code: list[str] = []
        self.text: list[str] = []

    def add(self, seconds: float, view: _View, event_type: str, **fields: object) -> None:
        self.seconds.append(float(seconds))
        self.viewer.append(view.viewer)
        self.device_id.append(view.device_id)
        self.type.append(event_type)
        self.product_id.append(str(fields.get("product_id", "")))
        self.question_id.append(str(fields.get("question_id", "")))
        self.answer.append(str(fields.get("answer", "")))
        self.is_correct.append(fields.get("is_correct"))
        self.coupon_code.append(str(fields.get("coupon_code", "")))
        self.text.append(str(fields.get("text", "")))


def _emit_viewing(
    rng: np.random.Generator, log: _EventLog, view: _View, parameters: ViewingParameters
) -> None:
    log.add(view.start, view, "view_start")
    period = parameters.heartbeat_seconds
    jitter = parameters.heartbeat_jitter
    count = int((view.end - view.start) / (period - jitter)) + 1
    beats = view.start + np.cumsum(rng.uniform(period - jitter, period + jitter, size=count))
    kept = beats[(beats < view.end) & (rng.random(count) >= parameters.heartbeat_loss)]
    for beat in kept:
        log.add(beat, view, "heartbeat")
    if rng.random() >= parameters.view_end_loss:
        log.add(view.end, view, "view_end")


def _engagement_probability(share: float, viewer: _Viewer, parameters: ViewingParameters) -> float:
    # Scaling by the propensity keeps the average near ``share`` while the same heavy
    # users chat, like and click.
    return min(1.0, share * viewer.propensity / parameters.mean_propensity)


def _random_moment(rng: np.random.Generator, views: list[_View]) -> tuple[float, _View]:
    lengths = np.array([max(view.end - view.start, 1e-3) for view in views])
    view = views[rng.choice(len(views), p=lengths / lengths.sum())]
    return rng.uniform(view.start, view.end), view


def _view_covering(views: list[_View], moment: float) -> _View | None:
    for view in views:
        if view.start <= moment < view.end:
            return view
    return None


def _emit_chat(
    rng: np.random.Generator, log: _EventLog, viewer: _Viewer, parameters: ViewingParameters
) -> None:
    if rng.random() >= _engagement_probability(parameters.chat_share, viewer, parameters):
        return
    for _ in range(rng.geometric(1.0 / parameters.chat_messages_mean)):
        moment, view = _random_moment(rng, viewer.views)
        # A message has an even chance to react to a product the host has just shown,
        # if the viewer was watching then.
        reveal = REVEAL_SECONDS[rng.integers(len(REVEAL_SECONDS))]
        reaction = reveal + rng.exponential(45.0)
        covering = _view_covering(viewer.views, reaction)
        if rng.random() < 0.5 and covering is not None:
            moment, view = reaction, covering
        log.add(moment, view, "chat", text=CHAT_TEXTS[rng.integers(len(CHAT_TEXTS))])


def _emit_likes(
    rng: np.random.Generator, log: _EventLog, viewer: _Viewer, parameters: ViewingParameters
) -> None:
    if rng.random() >= _engagement_probability(parameters.like_share, viewer, parameters):
        return
    for _ in range(rng.geometric(0.5)):
        moment, view = _random_moment(rng, viewer.views)
        taps = moment + np.cumsum(rng.uniform(0.3, 1.5, size=rng.integers(3, 13)))
        for tap in taps[taps < view.end]:
            log.add(tap, view, "like")


def _emit_clicks(
    rng: np.random.Generator,
    log: _EventLog,
    viewer: _Viewer,
    show: _Show,
    catalogue: np.ndarray,
    parameters: ViewingParameters,
) -> None:
    if rng.random() >= _engagement_probability(parameters.click_share, viewer, parameters):
        return
    for _ in range(rng.geometric(1.0 / 1.5)):
        moment, view = _random_moment(rng, viewer.views)
        revealed = [p for p, at in zip(show.featured, REVEAL_SECONDS, strict=False) if at <= moment]
        if revealed and rng.random() < parameters.featured_click_share:
            product = revealed[-1] if rng.random() < 0.6 else revealed[rng.integers(len(revealed))]
        else:
            product = catalogue[rng.integers(len(catalogue))]
        log.add(moment, view, "product_click", product_id=product)


def _emit_buyer_click(rng: np.random.Generator, log: _EventLog, viewer: _Viewer) -> None:
    if not viewer.bought_products:
        return
    product = viewer.bought_products[rng.integers(len(viewer.bought_products))]
    view = viewer.views[0]
    if viewer.paid_span is not None:
        moment = viewer.click_at
    else:
        moment = rng.uniform(view.start, view.end)
    log.add(moment, view, "product_click", product_id=product)


def _member_views_at(viewers: list[_Viewer], moment: float) -> list[_View]:
    """Return one view per member who watches at ``moment``, leaving out anonymous viewers."""
    present = []
    for viewer in viewers:
        view = _view_covering(viewer.views, moment)
        if view is not None and viewer.member_id:
            present.append(view)
    return present


def _reply_time(rng: np.random.Generator, view: _View, moment: float) -> float:
    return moment + rng.uniform(0.0, min(90.0, view.end - moment))


def _emit_survey_and_quiz(
    rng: np.random.Generator, log: _EventLog, viewers: list[_Viewer], parameters: ViewingParameters
) -> None:
    for view in _member_views_at(viewers, SURVEY_SECONDS):
        if rng.random() < parameters.answer_share:
            answer = SURVEY_ANSWERS[rng.integers(len(SURVEY_ANSWERS))]
            at = _reply_time(rng, view, SURVEY_SECONDS)
            log.add(at, view, "answer", question_id=SURVEY_QUESTION, answer=answer)

    correct = QUIZ_ANSWERS[rng.integers(len(QUIZ_ANSWERS))]
    wrong = [answer for answer in QUIZ_ANSWERS if answer != correct]
    for view in _member_views_at(viewers, QUIZ_SECONDS):
        if rng.random() >= parameters.answer_share:
            continue
        is_correct = bool(rng.random() < parameters.quiz_correct_share)
        answer = correct if is_correct else wrong[rng.integers(len(wrong))]
        at = _reply_time(rng, view, QUIZ_SECONDS)
        log.add(at, view, "answer", question_id=QUIZ_QUESTION, answer=answer, is_correct=is_correct)


def _emit_coupon_claims(
    rng: np.random.Generator,
    log: _EventLog,
    viewers: list[_Viewer],
    show: _Show,
    parameters: ViewingParameters,
) -> None:
    code = f"LIVE-{show.broadcast_id}"
    for view in _member_views_at(viewers, COUPON_SECONDS):
        if rng.random() < parameters.coupon_share:
            log.add(_reply_time(rng, view, COUPON_SECONDS), view, "coupon_claim", coupon_code=code)


def simulate_viewer_events(
    broadcast: Mapping[str, object],
    orders: pd.DataFrame,
    members: pd.DataFrame,
    products: pd.DataFrame,
    seed: int,
    parameters: ViewingParameters = DEFAULT_PARAMETERS,
) -> pd.DataFrame:
    """Simulate the viewer events of one broadcast, with the contract's columns.

    Members who paid during the broadcast join with probability ``during_buyer_joins``
    and watch from before a click on a product of their order until after paying.
    Members who paid within 24 hours after the end join with ``after_buyer_joins`` and
    click a product they later buy. Other members browse without buying, until the
    number of member viewers reaches a uniform draw from ``member_viewers`` (250-400 by
    default). Anonymous viewers are added on top. Chat, answers and
    coupon claims come from members only. About 0.5% of events are repeated with the
    same event ID and payload, as at-least-once delivery would do.
    """
    show = _Show.from_broadcast(broadcast)
    rng = broadcast_generator(seed, show.broadcast_id)
    buyers = find_window_buyers(orders, show.start_ms)
    viewers = _cast_viewers(rng, buyers, members, parameters)
    _plan_views(rng, viewers, parameters)

    is_product = products["category"] != NON_PRODUCT_CATEGORY
    catalogue = products.loc[is_product, "product_id"].to_numpy(dtype=str)
    log = _EventLog()
    for viewer in viewers:
        for view in viewer.views:
            _emit_viewing(rng, log, view, parameters)
        _emit_buyer_click(rng, log, viewer)
        _emit_likes(rng, log, viewer, parameters)
        _emit_clicks(rng, log, viewer, show, catalogue, parameters)
        if viewer.member_id:
            _emit_chat(rng, log, viewer, parameters)
    _emit_survey_and_quiz(rng, log, viewers, parameters)
    _emit_coupon_claims(rng, log, viewers, show, parameters)
    return _to_event_frame(rng, log, viewers, show, parameters)


def _to_event_frame(
    rng: np.random.Generator,
    log: _EventLog,
    viewers: list[_Viewer],
    show: _Show,
    parameters: ViewingParameters,
) -> pd.DataFrame:
    epoch_ms = show.start_ms + np.rint(np.array(log.seconds) * 1000.0).astype(np.int64)
    type_rank = np.array([EVENT_TYPES.index(event_type) for event_type in log.type])
    device = np.array(log.device_id)
    order = np.lexsort((type_rank, device, epoch_ms))

    events = pd.DataFrame(
        {
            "broadcast_id": show.broadcast_id,
            "member_id": [viewers[index].member_id for index in log.viewer],
            "device_id": device,
            "type": log.type,
            "occurred_at": format_london_times(epoch_ms),
            "product_id": log.product_id,
            "question_id": log.question_id,
            "answer": log.answer,
            "is_correct": pd.Series(log.is_correct, dtype=object),
            "coupon_code": log.coupon_code,
            "text": log.text,
        }
    )
    events = events.iloc[order].reset_index(drop=True)
    events.insert(0, "event_id", [f"{show.broadcast_id}-{n:06d}" for n in range(len(events))])
    return _redeliver_some(rng, events, parameters.duplicate_share)


def _redeliver_some(rng: np.random.Generator, events: pd.DataFrame, share: float) -> pd.DataFrame:
    """Repeat a share of events right after the original, as a retried delivery would."""
    repeated = events[rng.random(len(events)) < share]
    position = np.concatenate([np.arange(len(events)), repeated.index.to_numpy() + 0.5])
    combined = pd.concat([events, repeated], ignore_index=True)
    return combined.iloc[np.argsort(position, kind="stable")].reset_index(drop=True)
