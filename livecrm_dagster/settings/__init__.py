"""Shop settings: every threshold, delay and zone an operator may change, read from YAML."""

from __future__ import annotations

import os
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SETTINGS_ENV_VAR = "LIVECRM_SETTINGS"
DEFAULT_SETTINGS_PATH = Path(__file__).with_name("shop.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSettings(_Strict):
    """How to read one input: the zone its zone-less times are in, if the source declares one."""

    timezone: str | None = None

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            _zone(value)
        return value


class SessionSettings(_Strict):
    """Sessionization: a gap longer than max(heartbeats × interval, minimum) cuts a session."""

    heartbeat_seconds: float = Field(10, gt=0)
    timeout_heartbeats: float = Field(3, gt=0)
    minimum_timeout_seconds: float = Field(60, ge=0)
    implausible_hours: float = Field(24, gt=0)

    @property
    def timeout_seconds(self) -> float:
        return max(self.timeout_heartbeats * self.heartbeat_seconds, self.minimum_timeout_seconds)


class TierSettings(_Strict):
    """Viewing-rate thresholds of the non-buyer tiers."""

    hot_rate: float = Field(0.8, ge=0, le=1)
    mid_rate: float = Field(0.4, ge=0, le=1)
    hot_min_chats: int = Field(1, ge=0)
    coupon_rate: float = Field(0.8, ge=0, le=1)


class AttributionSettings(_Strict):
    """Windows of the post-live and clicked-then-bought attribution rules."""

    post_live_days: float = Field(7, ge=0)
    clicked_then_bought_days: float = Field(7, ge=0)


class QualitySettings(_Strict):
    """Thresholds of the data-quality checks."""

    max_quarantine_share: float = Field(0.05, ge=0, le=1)


class OperationsSettings(_Strict):
    """When analytics run: after a settling delay, and again while late orders arrive."""

    settle_minutes: float = Field(30, ge=0)
    refresh_days: float = Field(7, ge=0)
    max_input_age_hours: float = Field(36, gt=0)


class ShopSettings(_Strict):
    """Everything the analytics need to know about the shop."""

    shop_name: str = "livecrm shop"
    timezone: str = "Asia/Tokyo"
    currency: str = "JPY"
    sessions: SessionSettings = SessionSettings()
    tiers: TierSettings = TierSettings()
    attribution: AttributionSettings = AttributionSettings()
    quality: QualitySettings = QualitySettings()
    operations: OperationsSettings = OperationsSettings()
    sources: dict[str, SourceSettings] = {}

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        _zone(value)
        return value

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def source_zone(self, source: str) -> str | None:
        setting = self.sources.get(source)
        return setting.timezone if setting else None


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as error:
        message = f"unknown time zone {name!r}; use an IANA name such as Asia/Tokyo"
        raise ValueError(message) from error


class SettingsError(ValueError):
    """The settings file is missing or invalid."""


def load_settings(path: str | os.PathLike | None = None) -> ShopSettings:
    """Load shop settings from `path`, else from $LIVECRM_SETTINGS, else the bundled defaults."""
    path = Path(path or os.environ.get(SETTINGS_ENV_VAR) or DEFAULT_SETTINGS_PATH)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as error:
        raise SettingsError(f"settings file not found: {path}") from error
    except yaml.YAMLError as error:
        raise SettingsError(f"settings file {path} is not valid YAML: {error}") from error
    try:
        return ShopSettings.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
            for item in error.errors()
        )
        raise SettingsError(f"invalid settings in {path}: {problems}") from error
