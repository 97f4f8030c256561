"""pipecat's OpenAI Realtime service, unmodified, as its users run it: a pipeline of the context
aggregators around `OpenAIRealtimeLLMService` pointed at our WebSocket transport (demo weights).

One session walks through what a pipecat bot does: it starts from a context holding only the system
prompt (a reply with no user input), answers a spoken turn (server VAD), takes an appended message
(pipecat sends it as a `system` item) and is barged in on while it speaks. Every step must end without
an `error` event from the server, without an ErrorFrame in the pipeline and within its deadline.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    LLMMessagesAppendFrame,
    LLMRunFrame,
    TTSAudioRawFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.task import PipelineParams, PipelineTask
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService

from tests.frameworks.conftest import API_KEY, REPLY_TIMEOUT_S, WIRE_RATE_HZ, Sent, errors, speech_pcm16

FRAME_MS = 20  # what a transport's input pushes at a time


class Sink(FrameProcessor):
    """The end of the pipeline, where an output transport would be: every frame that reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[Frame] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        self.frames.append(frame)
        await self.push_frame(frame, direction)

    def audio_bytes(self, after: int = 0) -> int:
        return sum(len(f.audio) for f in self.frames[after:] if isinstance(f, TTSAudioRawFrame))


async def speak(task: PipelineTask, pcm16: bytes) -> None:
    """A microphone: 20 ms input frames at 24 kHz, in real time."""
    step = WIRE_RATE_HZ * FRAME_MS // 1000 * 2
    start = time.monotonic()
    for i, offset in enumerate(range(0, len(pcm16), step)):
        frame = InputAudioRawFrame(
            audio=pcm16[offset : offset + step], sample_rate=WIRE_RATE_HZ, num_channels=1
        )
        await task.queue_frame(frame)
        await asyncio.sleep(max(0.0, start + (i + 1) * FRAME_MS / 1000 - time.monotonic()))


class Inject(FrameProcessor):
    """Between the user aggregator and the service, where an app's own processor (RTVI, a tool runner)
    pushes frames for the service: the user aggregator would consume an append itself."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)


def done_responses(sent: Sent, after: int = 0) -> list[dict]:
    return [e["response"] for e in sent[after:] if e["type"] == "response.done"]


@pytest.mark.timeout(300)
async def test_pipecat_session(glm_ws, sent):
    llm = OpenAIRealtimeLLMService(
        api_key=API_KEY, base_url=glm_ws.base_url.replace("http", "ws", 1) + "/v1/realtime"
    )
    context = LLMContext(messages=[{"role": "system", "content": "You are a friendly voice assistant."}])
    aggregators = LLMContextAggregatorPair(context)
    sink, inject = Sink(), Inject()
    pipeline = Pipeline([aggregators.user(), inject, llm, sink, aggregators.assistant()])
    task = PipelineTask(
        pipeline,
        params=PipelineParams(audio_in_sample_rate=WIRE_RATE_HZ, audio_out_sample_rate=WIRE_RATE_HZ),
        idle_timeout_secs=None,
    )
    pipeline_errors: list[ErrorFrame] = []

    @task.event_handler("on_pipeline_error")
    async def on_error(_task, frame: ErrorFrame) -> None:
        pipeline_errors.append(frame)
        sent.arrived.set()

    runner = PipelineRunner(handle_sigint=False)
    running = asyncio.get_running_loop().create_task(runner.run(task))

    def check(step: str) -> None:
        assert not errors(sent), f"{step}: the server sent {errors(sent)}"
        assert not pipeline_errors, f"{step}: the pipeline got {[f.error for f in pipeline_errors]}"

    try:
        # 1. The bot starts: the context holds only the system prompt, and the run frame asks for a reply.
        await task.queue_frame(LLMRunFrame())
        await sent.until(lambda: done_responses(sent) or pipeline_errors, REPLY_TIMEOUT_S, "the greeting")
        check("start with the system prompt only")
        assert done_responses(sent)[0]["status"] == "completed" and sink.audio_bytes() > 0

        # 2. A spoken turn: server VAD ends it, the server answers it.
        mark, frames = len(sent), len(sink.frames)
        await speak(task, speech_pcm16("What is the weather like today?"))
        await sent.until(lambda: done_responses(sent, mark) or pipeline_errors, REPLY_TIMEOUT_S, "the reply")
        check("spoken turn")
        assert [e["type"] for e in sent[mark:]].count("input_audio_buffer.committed") == 1
        assert done_responses(sent, mark)[0]["status"] == "completed" and sink.audio_bytes(frames) > 0

        # 3. An appended message that asks for a reply (pipecat sends it as a system item).
        mark, frames = len(sent), len(sink.frames)
        append = LLMMessagesAppendFrame(
            messages=[{"role": "user", "content": "Tell me about rivers."}], run_llm=True
        )
        await inject.push_frame(append)
        await sent.until(lambda: done_responses(sent, mark) or pipeline_errors, REPLY_TIMEOUT_S, "the reply")
        check("appended message")
        added = [e["item"] for e in sent[mark:] if e["type"] == "conversation.item.added"]
        assert added[0]["role"] == "system" and added[0]["content"][0]["text"] == "Tell me about rivers."
        assert done_responses(sent, mark)[0]["status"] == "completed" and sink.audio_bytes(frames) > 0

        # 4. Barge-in: a question, and the user speaks again as soon as its reply's audio arrives.
        mark = len(sent)
        question = asyncio.get_running_loop().create_task(
            speak(task, speech_pcm16("What is a river?", silence_s=0.7))
        )
        await sent.until(
            lambda: any(e["type"] == "response.output_audio.delta" for e in sent[mark:]) or pipeline_errors,
            REPLY_TIMEOUT_S,
            "the reply's audio",
        )
        await question
        await speak(task, speech_pcm16("Stop, I have another question."))
        await sent.until(
            lambda: len(done_responses(sent, mark)) >= 2 or pipeline_errors, REPLY_TIMEOUT_S, "the reply"
        )
        check("barge-in")
        assert [e["type"] for e in sent[mark:]].count("input_audio_buffer.speech_started") == 2
        assert sent.of_type("conversation.item.truncated", mark)  # pipecat cut what it had played
        assert done_responses(sent, mark)[-1]["status"] == "completed"
    finally:
        await task.queue_frame(EndFrame())
        try:
            await asyncio.wait_for(asyncio.shield(running), 15)
        except TimeoutError:
            await task.cancel()
            await running
