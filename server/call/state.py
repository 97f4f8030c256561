"""Where a call is in its conversation, as one value (logged, read by the watchdog and the reply flow)."""

from __future__ import annotations

import enum


class CallState(enum.Enum):
    CONNECTING = "connecting"  # answered, the peer has not connected yet
    LISTENING = "listening"  # connected, nobody talking
    USER_SPEAKING = "user_speaking"  # the VAD hears the user (also over the assistant)
    THINKING = "thinking"  # a reply was started, none of its audio has played yet
    SPEAKING = "speaking"  # the reply's audio is playing
    CLOSED = "closed"  # `Call.close()` ran; nothing changes it back
