"""The headless client asks for transcripts of the user's spoken turns and prints them (text) or passes the
events on (--json)."""

from __future__ import annotations

import io
import json

from client.report import JsonReport, TextReport
from client.turns import MODES, session_for

T = "conversation.item.input_audio_transcription"


def test_every_mode_asks_for_transcripts() -> None:
    for mode in MODES:
        assert session_for(mode, None)["audio"]["input"]["transcription"] == {"model": "whisper"}


def test_the_words_are_printed_under_the_spoken_turn() -> None:
    out = io.StringIO()
    report = TextReport(out)
    report({"type": "client.user_turn", "kind": "spoken", "item_id": "item_1", "duration_s": 1.9})
    report({"type": f"{T}.delta", "item_id": "item_1", "delta": "Hello"})  # the completed text is printed
    report({"type": f"{T}.completed", "item_id": "item_1", "transcript": "Hello there."})
    report({"type": f"{T}.failed", "item_id": "item_2", "error": {"message": "no words"}})
    assert out.getvalue().splitlines() == [
        "you: (spoken, 1.9 s)",
        "you said: Hello there.",
        "  [not transcribed: no words]",
    ]
    raw = io.StringIO()
    event = {"type": f"{T}.completed", "item_id": "item_1", "transcript": "你好"}
    JsonReport(raw)(event)
    assert json.loads(raw.getvalue()) == event
