"""What the user sees: the live transcript with each turn's latency timeline, or (--json) every event as
one JSON line for scripts. Both are `emit` callbacks for client.call.Call."""

from __future__ import annotations

import json
import sys
from typing import TextIO


class JsonReport:
    def __init__(self, out: TextIO = sys.stdout) -> None:
        self._out = out

    def __call__(self, event: dict) -> None:
        self._out.write(json.dumps(event, ensure_ascii=False) + "\n")
        self._out.flush()


def timeline(turn: dict) -> str:
    """`speech_stopped 0 > tokens_ready 35 > ... > first_frame_sent 310 | heard 380 ms`."""
    stages = sorted(turn.get("stages_ms", {}).items(), key=lambda kv: kv[1])
    parts = " > ".join(f"{name} {round(ms)}" for name, ms in stages)
    heard = turn.get("first_audio_heard_ms")
    return (parts or "no server timeline") + (f" | heard {heard}" if heard is not None else "") + " ms"


class TextReport:
    """The transcript as it happens: `you: ...`, `assistant: ...` streamed, then the turn's timeline."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self._out = out
        self._open_line = False  # an assistant line is being streamed

    def _line(self, text: str) -> None:
        if self._open_line:
            self._out.write("\n")
            self._open_line = False
        self._out.write(text + "\n")
        self._out.flush()

    def __call__(self, event: dict) -> None:
        kind = event.get("type", "")
        if kind == "client.connected":
            again = f" (connection {event['connection']})" if event["connection"] > 1 else ""
            self._line(f"connected: call {event['call_id']}{again}")
        elif kind == "client.reconnecting":
            self._line(f"reconnecting in {event['delay_s']:g} s: {event['reason']}")
        elif kind == "client.lost":
            self._line(f"connection lost: {event['reason']}")
        elif kind == "client.push_to_talk":
            self._line("[talking... Enter to send]" if event["pressed"] else "[sent]")
        elif kind == "client.user_turn":
            said = event["text"] if event["kind"] == "typed" else f"(spoken, {event['duration_s']:.1f} s)"
            self._line(f"you: {said}")
        elif kind == "conversation.item.input_audio_transcription.completed":
            self._line(f"you said: {event.get('transcript', '')}")
        elif kind == "conversation.item.input_audio_transcription.failed":
            self._line(f"  [not transcribed: {event.get('error', {}).get('message', '')}]")
        elif kind == "response.output_audio_transcript.delta":
            if not self._open_line:
                self._out.write("assistant: ")
                self._open_line = True
            self._out.write(event.get("delta", ""))
            self._out.flush()
        elif kind == "client.turn":
            if event.get("cut_off"):
                played = event.get("played_ms")
                at = f" after {played / 1000:.1f} s" if played is not None else ""
                self._line(f"  [cut off{at}: {event['cut_off']}]")
            self._line(f"  latency: {timeline(event)}")
        elif kind == "error":
            self._line(f"server error: {event.get('error', {}).get('message', '')}")
        elif kind == "glm4voice.server.shutting_down":
            self._line(f"the server is shutting down (grace {event.get('grace_s')} s)")
