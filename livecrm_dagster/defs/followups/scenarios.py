"""Follow-up scenarios read from YAML and validated at load, with errors naming step and field."""

from __future__ import annotations

import datetime as dt
import os
import re
import string
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCENARIOS_ENV_VAR = "LIVECRM_SCENARIOS"
DEFAULT_SCENARIOS_PATH = Path(__file__).parents[2] / "settings" / "scenarios.yaml"

SEGMENT_NAMES = ("hot", "mid", "low", "coupon", "clicked_not_bought", "survey", "buyer")
CHANNEL_KINDS = ("outbox", "webhook", "line", "line_multicast", "email")
CONSENT_COLUMNS = ("consent_email", "consent_line", "consent_webhook")
PLACEHOLDERS = frozenset(
    {
        "shop_name",
        "broadcast_title",
        "archive_url",
        "offer_expires_at",
        "products",
        "next_broadcast_at",
    }
)
Content = Literal[
    "plain",
    "archive",
    "low_stock",
    "reviews",
    "related_products",
    "other_categories",
    "product_detail",
    "survey_match",
    "next_broadcast",
]
_STEP_ID = re.compile(r"^[A-Za-z0-9_]+$")
_DELAY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([mhd])\s*$")
_DELAY_UNITS = {"m": "minutes", "h": "hours", "d": "days"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _time_of_day(value: str) -> dt.time:
    try:
        return dt.time.fromisoformat(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"invalid time of day {value!r}; use HH:MM or HH:MM:SS") from error


class QuietHours(_Strict):
    """Half-open range [start, end) of shop time in which nothing is sent."""

    start: str = "21:00"
    end: str = "09:00"

    @field_validator("start", "end")
    @classmethod
    def _valid_time(cls, value: str) -> str:
        _time_of_day(value)
        return value

    @property
    def start_time(self) -> dt.time:
        return _time_of_day(self.start)

    @property
    def end_time(self) -> dt.time:
        return _time_of_day(self.end)


class FrequencyCap(_Strict):
    """Maximum messages per member per shop day across broadcasts; 0 turns the cap off."""

    messages_per_shop_day: int = Field(1, ge=0)


class ChannelSettings(_Strict):
    """The member consent column a channel requires."""

    consent: Literal["consent_email", "consent_line", "consent_webhook"]


class Template(_Strict):
    """Subject and text of a message, with `{placeholder}` fields."""

    subject: str
    text: str

    @field_validator("subject", "text")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(value) if name}
        except ValueError as error:
            raise ValueError(f"invalid template text {value!r}: {error}") from error
        unknown = sorted(fields - PLACEHOLDERS)
        if unknown:
            raise ValueError(f"unknown placeholders {unknown}; allowed: {sorted(PLACEHOLDERS)}")
        return value


class Offer(_Strict):
    """An offer such as a coupon: steps sharing `id` send it once per member and broadcast.

    It expires at `time` (shop time) on the shop day `days_after_due` days after the step's
    due time. A send that cannot go out before then is skipped.
    """

    id: str = Field(min_length=1)
    time: str = "23:59:59"
    days_after_due: int = Field(0, ge=0)

    @field_validator("time")
    @classmethod
    def _valid_time(cls, value: str) -> str:
        _time_of_day(value)
        return value


class Step(_Strict):
    """One message of a scenario: who gets it, when, through which channel."""

    id: str
    segments: list[str] = Field(min_length=1)
    delay: str | None = None
    at: str | None = None
    days_after_end: int = Field(0, ge=0)
    channel: str = "outbox"
    template: str
    content: Content = "plain"
    priority: int = 0
    exclude_buyers_since: Literal["broadcast_start", "broadcast_end"] | None = "broadcast_start"
    offer: Offer | None = None
    counts_toward_cap: bool = True
    survey_categories: dict[str, str] = {}

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        if not _STEP_ID.match(value):
            raise ValueError(f"invalid step id {value!r}; use letters, digits and _")
        return value

    @field_validator("segments")
    @classmethod
    def _known_segments(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in SEGMENT_NAMES]
        if unknown:
            raise ValueError(f"unknown segments {unknown}; allowed: {list(SEGMENT_NAMES)}")
        return value

    @field_validator("delay")
    @classmethod
    def _valid_delay(cls, value: str | None) -> str | None:
        if value is not None and not _DELAY.match(value):
            raise ValueError(f"invalid delay {value!r}; use a number and m, h or d, e.g. 2h")
        return value

    @field_validator("at")
    @classmethod
    def _valid_at(cls, value: str | None) -> str | None:
        if value is not None:
            _time_of_day(value)
        return value

    @model_validator(mode="after")
    def _one_timing(self) -> Step:
        if (self.delay is None) == (self.at is None):
            raise ValueError("set exactly one of `delay` (after the end) or `at` (time of day)")
        if self.delay is not None and self.days_after_end:
            raise ValueError("`days_after_end` goes with `at`, not with `delay`")
        if self.content == "survey_match" and not self.survey_categories:
            raise ValueError("content survey_match needs `survey_categories` (answer: category)")
        return self

    @property
    def delay_timedelta(self) -> dt.timedelta | None:
        if self.delay is None:
            return None
        number, unit = _DELAY.match(self.delay).groups()
        return dt.timedelta(**{_DELAY_UNITS[unit]: float(number)})

    @property
    def at_time(self) -> dt.time | None:
        return None if self.at is None else _time_of_day(self.at)


class Scenario(_Strict):
    """The steps sent to one audience; `enabled: false` pauses every step of it."""

    enabled: bool = True
    steps: list[Step] = Field(min_length=1)


class FollowupSettings(_Strict):
    """Every follow-up setting an operator may change."""

    quiet_hours: QuietHours = QuietHours()
    frequency_cap: FrequencyCap = FrequencyCap()
    holdout_share: float = Field(0.0, ge=0, le=1)
    followup_window_days: float = Field(10, gt=0)
    sending_lease_minutes: float = Field(10, gt=0)
    blocking_checks: list[str] = []
    channels: dict[str, ChannelSettings]
    templates: dict[str, Template]
    scenarios: dict[str, Scenario]

    @field_validator("blocking_checks")
    @classmethod
    def _check_keys(cls, value: list[str]) -> list[str]:
        invalid = [key for key in value if ":" not in key or key.endswith(":")]
        if invalid:
            raise ValueError(f"invalid check keys {invalid}; use <asset key>:<check name>")
        return value

    @field_validator("channels")
    @classmethod
    def _known_channels(cls, value: dict[str, ChannelSettings]) -> dict[str, ChannelSettings]:
        unknown = sorted(set(value) - set(CHANNEL_KINDS))
        if unknown:
            raise ValueError(f"unknown channels {unknown}; allowed: {list(CHANNEL_KINDS)}")
        return value

    @model_validator(mode="after")
    def _steps_consistent(self) -> FollowupSettings:
        seen: dict[str, str] = {}
        window = dt.timedelta(days=self.followup_window_days)
        for scenario_name, scenario in self.scenarios.items():
            for index, step in enumerate(scenario.steps):
                where = f"scenarios.{scenario_name}.steps.{index} ({step.id})"
                if step.id in seen:
                    raise ValueError(f"{where}.id: duplicate step id, also in {seen[step.id]}")
                seen[step.id] = scenario_name
                if step.channel not in self.channels:
                    raise ValueError(
                        f"{where}.channel: unknown channel {step.channel!r}; "
                        f"configured: {sorted(self.channels)}"
                    )
                if step.template not in self.templates:
                    raise ValueError(
                        f"{where}.template: unknown template {step.template!r}; "
                        f"configured: {sorted(self.templates)}"
                    )
                latest = step.delay_timedelta or dt.timedelta(days=step.days_after_end + 1)
                if latest > window:
                    raise ValueError(
                        f"{where}: due after the follow-up window of "
                        f"{self.followup_window_days} days; raise followup_window_days"
                    )
        return self

    def all_steps(self) -> list[tuple[str, Step]]:
        """Return (scenario name, step) for every step, enabled or not, in file order."""
        return [
            (name, step) for name, scenario in self.scenarios.items() for step in scenario.steps
        ]

    def enabled_steps(self) -> list[Step]:
        return [step for name, step in self.all_steps() if self.scenarios[name].enabled]

    def step(self, step_id: str) -> Step:
        for _, step in self.all_steps():
            if step.id == step_id:
                return step
        raise KeyError(f"unknown step {step_id!r}; configured: {self.step_ids()}")

    def scenario_of(self, step_id: str) -> str:
        for name, step in self.all_steps():
            if step.id == step_id:
                return name
        raise KeyError(f"unknown step {step_id!r}; configured: {self.step_ids()}")

    def is_enabled(self, step_id: str) -> bool:
        return self.scenarios[self.scenario_of(step_id)].enabled

    def step_ids(self) -> list[str]:
        return [step.id for _, step in self.all_steps()]


class ScenariosError(ValueError):
    """The scenarios file is missing or invalid."""


def scenarios_path(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get(SCENARIOS_ENV_VAR) or DEFAULT_SCENARIOS_PATH)


def load_scenarios(path: str | os.PathLike | None = None) -> FollowupSettings:
    """Load scenarios from `path`, else from $LIVECRM_SCENARIOS, else the bundled defaults."""
    path = scenarios_path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as error:
        raise ScenariosError(f"scenarios file not found: {path}") from error
    except yaml.YAMLError as error:
        raise ScenariosError(f"scenarios file {path} is not valid YAML: {error}") from error
    return parse_scenarios(raw, source=str(path))


def parse_scenarios(raw: dict, source: str = "scenarios") -> FollowupSettings:
    """Validate a scenarios mapping; errors name the step (with its id) and the field."""
    try:
        return FollowupSettings.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(_describe(raw, item) for item in error.errors())
        raise ScenariosError(f"invalid scenarios in {source}: {problems}") from error


def _describe(raw: dict, item: dict) -> str:
    location = [str(part) for part in item["loc"]]
    # Add the step id next to its index, so "scenarios.hot.steps.1.delay" reads
    # "scenarios.hot.steps.1 (hot_archive).delay".
    if len(location) >= 4 and location[0] == "scenarios" and location[2] == "steps":
        try:
            step_id = raw["scenarios"][location[1]]["steps"][int(location[3])].get("id")
        except (KeyError, IndexError, ValueError, TypeError, AttributeError):
            step_id = None
        if step_id:
            location[3] = f"{location[3]} ({step_id})"
    message = item["msg"].removeprefix("Value error, ")
    return f"{'.'.join(location)}: {message}"
