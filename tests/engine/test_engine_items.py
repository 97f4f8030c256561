"""Conversation items beyond the user's turns, on demo weights: a reply with no new input (a greeting, a
follow-up), per-reply instructions, system / developer / assistant text messages, and items placed after
a given item. Expected prompts come from pipeline/lm/prompt.py; the KV cache must equal the history's
prefix after every edit (the prefix rule)."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.lm.prompt import (
    message_block_ids,
    reply_header_ids,
    system_block_ids,
    user_block_ids,
)
from pipeline.responder import START, ReplyOptions, SessionSettings
from tests.engine.test_engine import check_cache_matches_history, check_complete_reply, collect
from tests.helpers.engine import settled


@pytest.fixture
def tok(responder):
    return responder.engine.scheduler.m.text


async def test_greeting_without_input_uses_its_own_instructions_once(responder, tok, script):
    """No item at all: the reply answers the system block alone (speech mode: a voice call's user will
    speak) with the reply's instructions in place of the session's; the next reply has the session's
    again, and the greeting stays in the history as an assistant turn."""
    session = responder.open_session("greet", SessionSettings(instructions="Be brief."))
    greeting = session.respond(ReplyOptions(instructions="Greet the user."))
    check_complete_reply(await collect(greeting), script, tok)
    d = session.dialogue
    header = reply_header_ids(tok)
    system = system_block_ids(tok, speech_input=True, instructions="Greet the user.")
    assert d.last_reply.gen.prompt_ids == system + header
    assert d.history.ids() == system + header + script["reply_ids"]

    session.add_text("Hi.")
    check_complete_reply(await collect(session.respond()), script, tok)
    session_system = system_block_ids(tok, speech_input=False, instructions="Be brief.")
    prompt = d.last_reply.gen.prompt_ids
    assert prompt == session_system + header + script["reply_ids"] + user_block_ids(tok, text="Hi.") + header
    assert "Greet the user." not in tok.decode(prompt)
    await settled(responder.engine)
    check_cache_matches_history(d)
    await session.close()


async def test_follow_up_without_new_input_prefills_only_the_header(responder, tok, script):
    session = responder.open_session("follow-up", SessionSettings())
    session.add_text("Tell me a story.")
    check_complete_reply(await collect(session.respond()), script, tok)
    d = session.dialogue
    before = d.history.ids()
    check_complete_reply(await collect(session.respond()), script, tok)
    header = reply_header_ids(tok)
    assert d.last_reply.gen.prompt_ids == before + header
    assert d.turn_prefilled_tokens[-1] == len(header)  # the conversation stayed cached
    assert d.history.ids() == before + header + script["reply_ids"]
    await session.close()


async def test_text_messages_of_every_role_enter_the_prompt_in_order(responder, tok, script):
    """system, developer and assistant text become GLM-4 chat blocks in the order they were added,
    before the reply that takes them; the system prompt's mode follows the last user item."""
    session = responder.open_session("roles", SessionSettings())
    session.add_message("system", "The user is called Ada.")  # item 0
    session.add_message("assistant", "Hello Ada, how can I help?")  # item 1
    session.add_message("developer", "Answer in one sentence.")  # item 2
    session.add_message("user", "What is a river?")  # item 3
    check_complete_reply(await collect(session.respond()), script, tok)
    d = session.dialogue
    want = (
        system_block_ids(tok, speech_input=False)
        + message_block_ids(tok, "system", "The user is called Ada.")
        + message_block_ids(tok, "assistant", "Hello Ada, how can I help?")
        + message_block_ids(tok, "developer", "Answer in one sentence.")
        + user_block_ids(tok, text="What is a river?")
        + reply_header_ids(tok)
    )
    assert d.last_reply.gen.prompt_ids == want
    assert tok.decode(want).count("<|system|>") == 3  # the system block, then the two messages
    await session.close()


async def test_items_placed_after_an_item_and_deleted_again(responder, tok, script):
    """`after` an item already in the history inserts it there (the cache keeps the common prefix and
    prefills the rest while idle); after a pending item it joins the pending input at that place; START
    puts it first. Deleting a message item takes it out again."""
    session = responder.open_session("placed", SessionSettings())
    session.add_text("Question A.")  # item 0
    turn_a = session.respond()
    check_complete_reply(await collect(turn_a), script, tok)
    d = session.dialogue
    system = system_block_ids(tok, speech_input=False)
    block_a, header, reply = (
        user_block_ids(tok, text="Question A."),
        reply_header_ids(tok),
        script["reply_ids"],
    )

    session.add_message("system", "Mind the units.", after=0)  # item 1: between A and its reply
    session.add_message("assistant", "Noted.", after=turn_a)  # item 2: after A's reply
    session.add_message("developer", "Stay polite.", after=START)  # item 3: first of all
    await settled(responder.engine)
    sys_1 = message_block_ids(tok, "system", "Mind the units.")
    asst_2 = message_block_ids(tok, "assistant", "Noted.")
    dev_3 = message_block_ids(tok, "developer", "Stay polite.")
    assert d.history.ids() == system + dev_3 + block_a + sys_1 + header + reply + asst_2
    check_cache_matches_history(d)

    session.add_text("Question B.")  # item 4: pending
    session.add_message("system", "B is about rivers.", after=4)  # item 5: pending, after B
    session.add_message("system", "Before B.", after=2)  # item 6: after item 2, the history's last
    session.delete_item(1)
    check_complete_reply(await collect(session.respond()), script, tok)
    want = (
        system
        + dev_3
        + block_a
        + header
        + reply
        + asst_2
        + message_block_ids(tok, "system", "Before B.")
        + user_block_ids(tok, text="Question B.")
        + message_block_ids(tok, "system", "B is about rivers.")
        + header
    )
    assert d.last_reply.gen.prompt_ids == want
    await settled(responder.engine)
    check_cache_matches_history(d)
    await session.close()


async def test_message_items_of_a_reply_in_progress_stay(responder, tok, script):
    """The input of the reply being generated cannot leave; an item inserted before it while it runs is
    in the history once the reply ends (the cache keeps the common prefix) and in the next prompt."""
    session = responder.open_session("busy", SessionSettings())
    session.add_message("system", "Context.")  # item 0
    session.add_text("Go.")  # item 1
    turn = session.respond()
    events = []

    async def edit_when_started() -> None:
        async for event in turn.events():
            events.append(event)
            if len(events) == 3:  # generating
                session.delete_item(0)
                session.add_message("assistant", "Earlier.", after=START)  # item 2

    await asyncio.wait_for(edit_when_started(), 60)
    check_complete_reply(events, script, tok)
    await settled(responder.engine)
    d = session.dialogue
    want = (
        system_block_ids(tok, speech_input=False)
        + message_block_ids(tok, "assistant", "Earlier.")
        + message_block_ids(tok, "system", "Context.")
        + user_block_ids(tok, text="Go.")
        + reply_header_ids(tok)
        + script["reply_ids"]
    )
    assert d.history.ids() == want
    assert d.cache.token_ids == want[: d.cache.length]
    check_complete_reply(await collect(session.respond()), script, tok)
    assert d.last_reply.gen.prompt_ids == want + reply_header_ids(tok)
    await session.close()
