"""Validation of JSON values in client events, and the error a client event that fails it becomes."""

from __future__ import annotations

import math


class ProtocolError(Exception):
    """A client event we cannot act on; becomes one `error` event, the call goes on."""

    def __init__(self, code: str, message: str, event_id: str | None = None, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.event_id = event_id
        self.param = param


class NotUtf8Text(bytes):
    """A data-channel text message whose bytes are not UTF-8 (server/webrtc/rtc.py hands it over as this)."""


def is_finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer of more than ~309 digits has no float
        return False


def encodes(text: str) -> bool:
    """JSON's \\ud800 escapes decode to lone surrogates, which no UTF-8 channel can send back."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(value: object, name: str, event_id: str | None) -> str:
    if not isinstance(value, str):
        raise ProtocolError("invalid_value", f"{name} must be a string", event_id, name)
    if not encodes(value):
        raise ProtocolError(
            "invalid_value", f"{name} is not valid Unicode (a lone surrogate)", event_id, name
        )
    return value


def check_flag(value: object, name: str, event_id: str | None) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError("invalid_value", f"{name} must be true or false", event_id, name)
    return value


def check_number(value: object, name: str, event_id: str | None, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not is_finite(value):
        raise ProtocolError("invalid_value", f"{name} must be a number", event_id, name)
    if not low <= value <= high:
        raise ProtocolError(
            "invalid_value", f"{name} must be in [{low}, {high}], got {value}", event_id, name
        )
    return value
