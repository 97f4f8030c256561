"""Commands from the asyncio side to the engine thread, each with its own handler.

A session method puts one command on the engine's queue and returns; the engine thread runs
`command.apply(scheduler)` between steps. If the engine has stopped, `unanswered()` makes sure nobody
waits forever on it. Adding a command is one class here. Torch-free: the asyncio side imports this.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline.engine.dialogue import Dialogue, heard_prefix_len
from pipeline.engine.reply import InputItem, ReplyState
from pipeline.lm.prompt import message_block_ids, user_block_ids
from pipeline.responder import ReplyError, SessionSettings

if TYPE_CHECKING:
    from pipeline.engine.scheduler import Scheduler

ENGINE_STOPPED = ReplyError("the engine has stopped", code="engine_stopped")


def _resolve(done: concurrent.futures.Future) -> None:
    if not done.done():
        done.set_result(None)


class Command:
    def apply(self, s: Scheduler) -> None:
        raise NotImplementedError

    def unanswered(self) -> None:
        """The engine stopped before running this command: answer whoever waits on it."""


@dataclass(frozen=True)
class Wake(Command):
    """Ids arrived from a remote token source: the engine's next step hands them out."""

    def apply(self, s: Scheduler) -> None:
        pass


@dataclass(frozen=True)
class Open(Command):
    dialogue: Dialogue

    def apply(self, s: Scheduler) -> None:
        s.open(self.dialogue)


@dataclass(frozen=True)
class Update(Command):
    dialogue: Dialogue
    settings: SessionSettings

    def apply(self, s: Scheduler) -> None:
        self.dialogue.settings = self.settings


@dataclass(frozen=True)
class PushAudio(Command):
    dialogue: Dialogue
    pcm16k: np.ndarray

    def apply(self, s: Scheduler) -> None:
        s.guarded(self.dialogue, self._push, s)

    def _push(self, s: Scheduler) -> None:
        d = self.dialogue
        if d.closed:
            return
        d.audio_pushed = True
        if s.transcription is not None:
            d.turn_audio.append(self.pcm16k)
        new_tokens = d.tokenizer_stream.push(self.pcm16k)
        if new_tokens:
            d.partial_audio_tokens.extend(new_tokens)
            d.early_prefill_wanted = True


@dataclass(frozen=True)
class Commit(Command):
    """The user's speech turn ended: its exact tokens become one pending item."""

    dialogue: Dialogue
    key: int | None = None  # the session's index of the user item

    def apply(self, s: Scheduler) -> None:
        s.guarded(self.dialogue, self._commit, s)

    def _commit(self, s: Scheduler) -> None:
        d = self.dialogue
        if d.closed or not d.audio_pushed:
            return
        s.hold_transcription()  # the turn's reply is about to be asked for: its prompt goes first
        d.tokenizer_stream.flush()
        tokens = list(d.tokenizer_stream.tokens)
        audio = np.concatenate(d.turn_audio) if d.turn_audio else None
        Discard(d).apply(s)
        d.tokens_ready_t = time.monotonic()
        if tokens and d.pending.has_room():
            d.pending.add(
                InputItem(user_block_ids(s.m.text, speech_tokens=tokens), speech_input=True, key=self.key)
            )
        if audio is not None and self.key is not None:
            s.transcribe(d, self.key, audio)


@dataclass(frozen=True)
class Discard(Command):
    dialogue: Dialogue

    def apply(self, s: Scheduler) -> None:
        d = self.dialogue
        if d.closed:
            return
        d.tokenizer_stream.reset()
        d.turn_audio.clear()
        d.partial_audio_tokens.clear()
        d.audio_pushed = False
        d.early_prefill_wanted = False


@dataclass(frozen=True)
class AddText(Command):
    """A text item: a typed user message, or a system / developer / assistant message. At the end (pending
    until a reply takes it), first (`at_start`), or right after the item named `after`; an item placed
    in the history is prefilled again by the prefix rule."""

    dialogue: Dialogue
    text: str
    key: int | None = None  # the session's index of the item
    role: str = "user"
    after: int | str | None = None  # an item's key (a user/message index, or a reply's id)
    at_start: bool = False

    def apply(self, s: Scheduler) -> None:
        s.guarded(self.dialogue, self._add, s)

    def _add(self, s: Scheduler) -> None:
        d = self.dialogue
        if d.closed or not self.text.strip() or not d.pending.has_room():  # no room: not even tokenised
            return
        user = self.role == "user"
        item = InputItem(
            message_block_ids(s.m.text, self.role, self.text),
            speech_input=False if user else None,
            text=self.text,
            key=self.key,
        )
        if d.add_item(item, self.after, self.at_start):
            _history_edited(s, d)


@dataclass(frozen=True)
class Respond(Command):
    dialogue: Dialogue
    reply: ReplyState

    def apply(self, s: Scheduler) -> None:
        d, reply = self.dialogue, self.reply
        if d.closed:
            reply.emit(ReplyError("the call is closed", code="call_closed"))
            return
        if d.reply is not None:  # a reply still running: the new turn replaces it
            s.guarded(d, s.cancel, d)
        pending = d.pending
        if pending.overflowed:
            pending.take()
            reply.emit(
                ReplyError(
                    f"too much user input waiting for a reply (more than {pending.max_items} messages "
                    f"or {pending.max_tokens} tokens); it was dropped",
                    code="input_too_large",
                )
            )
            return
        reply.items = pending.take()  # none: the reply answers the conversation as it stands
        reply.time.tokens_ready_t, d.tokens_ready_t = d.tokens_ready_t, None
        reply.audio.sample_rate_hz = s.m.decoder.sample_rate_hz
        d.reply = reply

    def unanswered(self) -> None:
        self.reply.emit(ENGINE_STOPPED)


@dataclass(frozen=True)
class Cancel(Command):
    """The reply's cancel flag is already set; this wakes the engine. The running reply is stopped by the
    next step (it sees the flag); a reply that already ended (its audio outlived generation, or the client
    truncates an earlier reply) is trimmed here to what the user heard."""

    dialogue: Dialogue
    reply: ReplyState

    def apply(self, s: Scheduler) -> None:
        s.guarded(self.dialogue, self._trim_finished, s)

    def _trim_finished(self, s: Scheduler) -> None:
        d, reply = self.dialogue, self.reply
        if reply is d.reply or reply.played_ms is None:
            return
        if d.trim_reply(reply, heard_prefix_len(reply.gen.generated_ids, s.m.text.is_audio, reply.played_ms)):
            _history_edited(s, d)


@dataclass(frozen=True)
class DeleteItem(Command):
    """`conversation.item.delete`: a user or message item (by its key) or an ended reply leaves the
    history; the context follows by the prefix rule. A reply cancelled but not yet stopped is stopped
    first, so that what it keeps is in the history before the edit."""

    dialogue: Dialogue
    item_key: int | None = None
    reply: ReplyState | None = None

    def apply(self, s: Scheduler) -> None:
        s.guarded(self.dialogue, self._delete, s)

    def _delete(self, s: Scheduler) -> None:
        d = self.dialogue
        if d.closed:
            return
        if d.reply is not None and d.reply.cancel_event.is_set():
            s.cancel(d)
        changed = d.delete_item(self.item_key) if self.item_key is not None else d.delete_reply(self.reply)
        if changed:
            _history_edited(s, d)


def _history_edited(s: Scheduler, d: Dialogue) -> None:
    """The history changed behind the context. With no reply running, the context keeps the common prefix
    now and the rest is prefilled again while the engine is idle (with the user's speech in progress, up
    to its final tokens), so the next turn prefills only its new block. A running reply's end does it."""
    if d.reply is not None:
        return
    s.source.rewind(d)
    if d.partial_audio_tokens:
        d.early_prefill_wanted = True
    else:
        s.source.begin(d, d.history.ids(), for_reply=False)


@dataclass(frozen=True)
class Close(Command):
    dialogue: Dialogue
    done: concurrent.futures.Future

    def apply(self, s: Scheduler) -> None:
        s.close(self.dialogue)
        _resolve(self.done)

    def unanswered(self) -> None:
        _resolve(self.done)


@dataclass(frozen=True)
class Stop(Command):
    def apply(self, s: Scheduler) -> None:
        s.shutdown()
