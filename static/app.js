// The call page: one client of the server's OpenAI-Realtime-style WebRTC protocol (docs/protocol.md).
// No build step. State the tests can read lives on window.glm4voice.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  call: $("call"), mute: $("mute"), state: $("state"), error: $("error"),
  text: $("text"), send: $("send"), form: $("text-form"), instructions: $("instructions"),
  apply: $("apply-instructions"), latency: $("latency"), micLevel: $("mic-level"), outLevel: $("out-level"),
  audio: $("remote-audio"),
};

const app = (window.glm4voice = {
  state: "idle", pc: null, channel: null, mic: null, callUrl: null, audioContext: null,
  events: [], stats: { maxMicLevel: 0, maxOutLevel: 0, speechStarted: 0, responses: 0 },
});

function setState(state) {
  app.state = state;
  ui.state.dataset.state = state;
  ui.state.textContent = state.replace("_", " ");
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = !message;
  if (message) setState("error");
}

function setInCall(inCall) {
  ui.call.textContent = inCall ? "Hang up" : "Call";
  ui.call.classList.toggle("hangup", inCall);
  ui.mute.disabled = ui.text.disabled = ui.send.disabled = !inCall;
}

// ----- audio: iOS unlock, level meters ---------------------------------------------------------

function unlockAudio() {
  // iOS Safari plays audio only if playback starts inside the user's tap: create/resume the context
  // and start the (still empty) <audio> element now.
  const Ctx = window.AudioContext || window.webkitAudioContext;
  if (!app.audioContext && Ctx) app.audioContext = new Ctx();
  if (app.audioContext && app.audioContext.state === "suspended") app.audioContext.resume();
  ui.audio.muted = false;
  ui.audio.play().catch(() => {});
}

function meter(stream, element, key) {
  if (!app.audioContext) return;
  const source = app.audioContext.createMediaStreamSource(stream);
  const analyser = app.audioContext.createAnalyser();
  analyser.fftSize = 1024;
  source.connect(analyser);
  const data = new Float32Array(analyser.fftSize);
  const tick = () => {
    if (!stream.active) { element.value = 0; return; }
    analyser.getFloatTimeDomainData(data);
    let sum = 0;
    for (const v of data) sum += v * v;
    const level = Math.min(1, Math.sqrt(sum / data.length) * 4);
    element.value = level;
    app.stats[key] = Math.max(app.stats[key], level);
    requestAnimationFrame(tick);
  };
  tick();
}

// ----- the call ------------------------------------------------------------------------------

async function startCall() {
  showError("");
  unlockAudio();
  setState("connecting");
  setInCall(true);
  let session, authorization;
  try {
    session = await (await fetch("/session")).json();
  } catch (e) {
    return fail("Connection failed: the server did not answer (" + e.message + ").");
  }
  try {
    authorization = await callAuthorization(session.auth || {});
    if (session.turn_withheld && authorization.Authorization) {
      // TURN credentials are only given to an authorised caller: ask again with the secret.
      session = await (await fetch("/session", { headers: authorization })).json();
    }
  } catch (e) {
    return fail(e.message);
  }
  try {
    app.mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
  } catch (e) {
    const denied = e.name === "NotAllowedError" || e.name === "SecurityError";
    return fail(denied ? "Microphone access was denied. Allow the microphone for this site and call again."
      : "No microphone could be opened (" + e.name + ": " + e.message + ").");
  }
  meter(app.mic, ui.micLevel, "maxMicLevel");
  const pc = (app.pc = new RTCPeerConnection({ iceServers: session.ice_servers }));
  app.mic.getTracks().forEach((track) => pc.addTrack(track, app.mic));
  pc.ontrack = (event) => {
    const stream = event.streams[0] || new MediaStream([event.track]);
    ui.audio.srcObject = stream;
    ui.audio.play().catch(() => {});
    meter(stream, ui.outLevel, "maxOutLevel");
  };
  pc.onconnectionstatechange = () => {
    if (pc.connectionState === "connected" && app.state === "connecting") setState("listening");
    if (pc.connectionState === "failed") fail("Connection failed: no network path to the server (ICE failed). "
      + "A TURN server may be needed.");
  };
  const channel = (app.channel = pc.createDataChannel("oai-events"));
  channel.onmessage = (event) => onServerEvent(JSON.parse(event.data));
  channel.onopen = () => {
    // The user's words on spoken turns; a server that cannot transcribe lists the field as ignored.
    const update = { audio: { input: { transcription: { model: "whisper" } } } };
    const instructions = ui.instructions.value.trim();
    if (instructions) update.instructions = instructions;
    send({ type: "session.update", session: update });
  };
  await pc.setLocalDescription(await pc.createOffer());
  await iceGathered(pc, session.ice_gather_timeout_ms || 2000);
  let response;
  try {
    // The page reads our glm4voice.* events (latency, discarded turns, why a call closes); the server sends
    // them only to a client that asks (docs/protocol.md "Extension events").
    const endpoint = new URL(session.calls_endpoint || "/v1/realtime/calls", window.location.href);
    endpoint.searchParams.set("glm4voice_events", "on");
    response = await fetch(endpoint, {
      method: "POST", body: pc.localDescription.sdp,
      headers: Object.assign({ "Content-Type": "application/sdp" }, authorization),
    });
  } catch (e) {
    return fail("Connection failed: " + e.message);
  }
  if (!response.ok) {
    let message = "HTTP " + response.status;
    try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
    const retry = response.headers.get("Retry-After");
    if (response.status === 503) {
      return fail("Server busy" + (retry ? ", retry in " + retry + " s" : "") + ". " + message);
    }
    if (response.status === 429) {
      return fail("Too many calls from this address" + (retry ? ", retry in " + retry + " s" : "") + ".");
    }
    if (response.status === 401) {
      app.clientSecret = null;  // expired or refused: the next call asks for a new one
      return fail("Not authorized: " + message);
    }
    return fail("The server refused the call: " + message);
  }
  app.callUrl = response.headers.get("Location");
  await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
}

// ----- auth: the page never holds the API key ------------------------------------------------

// A client secret (ek_...) reaches the page in the URL fragment, #client_secret=ek_... (an app backend
// that holds the API key mints it and links here; fragments are not sent to servers or logged), or,
// when the server allows it ([auth] page_secrets), the page mints one with a same-origin request.
function secretFromFragment() {
  const params = new URLSearchParams(window.location.hash.slice(1));
  const secret = params.get("client_secret");
  if (secret) history.replaceState(null, "", window.location.pathname + window.location.search);
  return secret;
}

async function callAuthorization(auth) {
  if (!auth.required) return {};
  app.clientSecret = app.clientSecret || secretFromFragment();
  const fresh = app.clientSecret && (!app.clientSecretExpiresAt || app.clientSecretExpiresAt > Date.now() / 1000 + 5);
  if (!fresh && auth.page_secrets) {
    const response = await fetch(auth.client_secrets_endpoint, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: "{}",
    });
    if (!response.ok) {
      let message = "HTTP " + response.status;
      try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error("Not authorized: " + message);
    }
    const minted = await response.json();
    app.clientSecret = minted.value;
    app.clientSecretExpiresAt = minted.expires_at;
  } else if (!fresh) {
    throw new Error("This server requires authorization: open this page through the link your app gives "
      + "(it carries a short-lived client secret).");
  }
  return { Authorization: "Bearer " + app.clientSecret };
}

function iceGathered(pc, timeoutMs) {
  // The server takes the offer in one POST (no trickle), so send it with our candidates in it.
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") resolve(); };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs);
  });
}

function hangup(reason) {
  if (app.callUrl) {
    const url = app.callUrl + "/hangup";
    // keepalive lets the request outlive the page (pagehide); sendBeacon is the fallback.
    fetch(url, { method: "POST", keepalive: true }).catch(() => navigator.sendBeacon && navigator.sendBeacon(url));
  }
  app.callUrl = null;
  if (app.channel) app.channel.close();
  if (app.pc) app.pc.close();
  if (app.mic) app.mic.getTracks().forEach((t) => t.stop());
  app.pc = app.channel = app.mic = null;
  ui.audio.srcObject = null;
  setInCall(false);
  if (reason !== "error") setState("idle");
}

function fail(message) {
  hangup("error");
  showError(message);
}

function send(event) {
  if (app.channel && app.channel.readyState === "open") app.channel.send(JSON.stringify(event));
}

// ----- server events -------------------------------------------------------------------------

function onServerEvent(event) {
  app.events.push(event);
  window.glm4voiceHistory.onEvent(event);  // static/history.js: the conversation, kept across reloads
  switch (event.type) {
    case "input_audio_buffer.speech_started":
      app.stats.speechStarted += 1;
      setState("user_speaking");
      break;
    case "input_audio_buffer.speech_stopped":
      setState("thinking");
      break;
    case "glm4voice.input_audio_buffer.discarded":
      setState("listening");
      break;
    case "response.created":
      app.stats.responses += 1;
      break;
    case "output_audio_buffer.started":
      setState("speaking");
      break;
    case "output_audio_buffer.stopped":
    case "output_audio_buffer.cleared":
      if (app.state === "speaking") setState("listening");
      break;
    case "response.done":
      if (app.state === "thinking") setState("listening");
      break;
    case "glm4voice.turn.latency":
      if (event.speech_stopped_to_first_frame_ms != null) {
        ui.latency.textContent = Math.round(event.speech_stopped_to_first_frame_ms) + " ms";
      }
      break;
    case "glm4voice.server.shutting_down":
      showError("The server is shutting down; this call ends within " + event.grace_s + " s.");
      break;
    case "glm4voice.call.closing":
      fail("The server ended the call: " + event.message + ".");
      break;
    case "error":
      showError("Server: " + event.error.message);
      setTimeout(() => { if (app.pc) { showError(""); setState("listening"); } }, 4000);
      break;
  }
}

// ----- controls ------------------------------------------------------------------------------

ui.call.addEventListener("click", () => (app.pc ? hangup("user") : startCall().catch((e) => fail(String(e)))));
ui.mute.addEventListener("click", () => {
  if (!app.mic) return;
  const muted = ui.mute.getAttribute("aria-pressed") !== "true";
  app.mic.getAudioTracks().forEach((t) => (t.enabled = !muted));
  ui.mute.setAttribute("aria-pressed", String(muted));
  ui.mute.textContent = muted ? "Unmute" : "Mute";
});
ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.text.value.trim();
  if (!text) return;
  window.glm4voiceHistory.typed(text);
  send({ type: "conversation.item.create", item: { type: "message", role: "user",
    content: [{ type: "input_text", text }] } });
  send({ type: "response.create" });
  ui.text.value = "";
});
ui.apply.addEventListener("click", () => send({ type: "session.update",
  session: { instructions: ui.instructions.value.trim() } }));
window.addEventListener("pagehide", () => { if (app.pc) hangup("pagehide"); });
