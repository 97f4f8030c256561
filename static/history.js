// The call's conversation history: every turn of every call, kept in this browser (localStorage), so it
// survives a reload. The server keeps no history across calls: a new call starts fresh and says so.
// app.js calls window.glm4voiceHistory.onEvent(event) for each server event and .typed(text) for typed turns.
"use strict";

(() => {
  const KEY = "glm4voice.history";
  // GLM-4-Voice interleaves 13 text tokens with 26 speech tokens of 80 ms (paper): one text delta per
  // 160 ms of audio. A reply cut after played_ms was heard up to delta floor(played_ms / 160).
  const MS_PER_TEXT_DELTA = 160;
  const list = document.getElementById("history");
  const copy = document.getElementById("copy-history");
  let turns = [];
  try { turns = JSON.parse(localStorage.getItem(KEY) || "[]"); } catch (e) { turns = []; }
  let reply = null; // the assistant turn being generated
  let silenceMs = 0; // the session's silence_duration_ms: a spoken turn's length excludes it
  const speechStartMs = {};

  function save() {
    try { localStorage.setItem(KEY, JSON.stringify(turns.slice(-500))); } catch (e) { /* full or private */ }
  }

  function render() {
    list.replaceChildren(...turns.map((turn) => {
      const li = document.createElement("li");
      li.className = turn.role + (turn.cutOff ? " cut" : "");
      if (turn.role === "note") {
        li.textContent = turn.text;
      } else if (turn.role === "user") {
        if (turn.kind === "typed") {
          li.textContent = turn.text;
        } else {
          // the words when a transcript came (they fill in as it is recognised), the duration beside them
          const words = document.createElement("span");
          words.className = "words";
          words.textContent = turn.words || (turn.notTranscribed ? "(not transcribed)" : "spoken");
          const duration = document.createElement("small");
          duration.className = "duration";
          duration.textContent = turn.durationS.toFixed(1) + " s";
          li.append(words, " ", duration);
        }
      } else {
        const heard = document.createElement("span");
        heard.className = "heard";
        heard.textContent = turn.deltas.slice(0, turn.heardDeltas ?? turn.deltas.length).join("");
        li.append(heard);
        if (turn.cutOff) {
          const unheard = document.createElement("span");
          unheard.className = "unheard";
          unheard.textContent = turn.deltas.slice(turn.heardDeltas).join("");
          const mark = document.createElement("span");
          mark.className = "cut-mark";
          mark.textContent = " ✂ cut off after " + (turn.playedMs / 1000).toFixed(1) + " s ";
          li.append(mark, unheard);
        }
        if (turn.latencyMs != null) {
          const latency = document.createElement("small");
          latency.className = "latency";
          latency.textContent = Math.round(turn.latencyMs) + " ms";
          li.append(latency);
        }
      }
      return li;
    }));
    list.scrollTop = list.scrollHeight;
  }

  function add(turn) {
    turns.push(turn);
    save();
    render();
    return turn;
  }

  function onEvent(event) {
    switch (event.type) {
      case "session.created": {
        const td = (((event.session || {}).audio || {}).input || {}).turn_detection || {};
        silenceMs = td.silence_duration_ms || 0;
        if (turns.length) add({ role: "note", text: "New call: the assistant starts fresh (it does not remember the turns above)." });
        break;
      }
      case "input_audio_buffer.speech_started":
        speechStartMs[event.item_id] = event.audio_start_ms;
        break;
      case "input_audio_buffer.speech_stopped":
        if (event.item_id in speechStartMs) {
          const ms = event.audio_end_ms - speechStartMs[event.item_id] - silenceMs;
          add({ role: "user", kind: "spoken", durationS: Math.max(ms, 0) / 1000, itemId: event.item_id });
        }
        break;
      case "conversation.item.input_audio_transcription.delta":
      case "conversation.item.input_audio_transcription.completed":
      case "conversation.item.input_audio_transcription.failed": {
        const turn = turns.find((t) => t.role === "user" && t.itemId === event.item_id);
        if (!turn) break;
        if (event.type.endsWith(".delta")) turn.words = (turn.words || "") + event.delta;
        else if (event.type.endsWith(".completed")) turn.words = event.transcript;
        else turn.notTranscribed = true;
        save(); render();
        break;
      }
      case "glm4voice.input_audio_buffer.discarded":
        turns = turns.filter((t) => !(t.role === "user" && t.itemId === event.item_id));
        save(); render();
        break;
      case "response.created":
        reply = add({ role: "assistant", id: event.response.id, deltas: [], cutOff: false });
        break;
      case "response.output_audio_transcript.delta":
        if (reply && reply.id === event.response_id) { reply.deltas.push(event.delta); save(); render(); }
        break;
      case "glm4voice.turn.latency": {
        const turn = turns.find((t) => t.id === event.response_id);
        const ms = event.speech_stopped_to_first_frame_ms ?? (event.stages_ms || {}).first_frame_sent;
        if (turn && ms != null) { turn.latencyMs = ms; save(); render(); }
        break;
      }
      case "glm4voice.response.cancelled": {
        const turn = turns.find((t) => t.id === event.response_id);
        if (turn) {
          turn.cutOff = true;
          turn.playedMs = event.played_ms;
          turn.heardDeltas = Math.floor(event.played_ms / MS_PER_TEXT_DELTA);
          save(); render();
        }
        break;
      }
    }
  }

  function typed(text) { add({ role: "user", kind: "typed", text }); }

  function asText() {
    return turns.map((t) => {
      if (t.role === "note") return "-- " + t.text;
      if (t.role === "user") {
        if (t.kind === "typed") return "You: " + t.text;
        return "You: " + (t.words ? t.words + " " : "") + "(spoken, " + t.durationS.toFixed(1) + " s)";
      }
      const heard = t.deltas.slice(0, t.heardDeltas ?? t.deltas.length).join("");
      return "Assistant: " + heard + (t.cutOff ? " [cut off; unheard: " + t.deltas.slice(t.heardDeltas).join("") + "]" : "");
    }).join("\n");
  }

  copy.addEventListener("click", () => {
    const text = asText();
    (navigator.clipboard ? navigator.clipboard.writeText(text) : Promise.reject(new Error("no clipboard")))
      .then(() => { copy.textContent = "Copied"; setTimeout(() => (copy.textContent = "Copy"), 1500); })
      .catch(() => { copy.textContent = "Copy failed"; });
  });
  document.getElementById("clear-history").addEventListener("click", () => { turns = []; save(); render(); });

  window.glm4voiceHistory = { onEvent, typed, asText, turns: () => turns };
  render();
})();
