"""Server settings: one frozen dataclass per `config.toml` section, env overrides on top.

Every key can be overridden by `GLM4VOICE_<SECTION>_<KEY>` (for example
`GLM4VOICE_WEBRTC_HOST_ADDRESSES=127.0.0.1`). Lists are comma-separated in the environment; booleans
accept 1/0/true/false/yes/no/on/off. Unknown sections or keys are errors, so a typo never silently
falls back to a default. The `[model]` section is `pipeline.engine.config.EngineConfig`.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.engine.config import EngineConfig, VLLMConfig
from pipeline.transcription.config import TranscriptionConfig

ENV_PREFIX = "GLM4VOICE_"


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"  # listen address; 0.0.0.0 to serve other machines (then use TLS in front)
    port: int = 8080  # TCP port
    max_body_bytes: int = 65_536  # largest POST body (an SDP offer is ~3-8 KB)
    public_url: str = ""  # base URL clients reach us at, for Location headers behind a proxy; "" = relative
    cors_origins: tuple[
        str, ...
    ] = ()  # other origins whose pages may call the API ("*" = any); () = same-origin only
    trust_forwarded_for: bool = (
        False  # take the client address from X-Forwarded-For (only behind a proxy you run)
    )
    trusted_proxy_hops: int = (
        1  # proxies you run in front of us: the address is the entry this many from the right
    )
    header_timeout_s: float = (
        10.0  # a connection must send a whole request head this soon (and idle no longer)
    )
    body_timeout_s: float = 10.0  # a request body must arrive this soon once its head has
    max_connections: int = 512  # open HTTP connections in total; the next one gets 503 server_busy
    max_connections_per_address: int = 32  # open HTTP connections per client address; the next one gets 429
    shutdown_grace_s: float = (
        10.0  # on SIGTERM/SIGINT: s that replies in progress get before calls are closed
    )


@dataclass(frozen=True)
class WebRTCConfig:
    host_addresses: tuple[str, ...] = ()  # IPs offered as host candidates; () = every non-loopback address
    stun_urls: tuple[str, ...] = ()  # e.g. "stun:stun.l.google.com:19302"; used by server and page
    turn_urls: tuple[str, ...] = ()  # e.g. "turn:turn.example.com:3478?transport=udp"
    turn_username: str = ""
    turn_credential: str = ""
    receive_jitter_frames: int = 0  # 20 ms frames held before decoding; aiortc's default is 4 (80 ms)
    ice_gather_timeout_ms: int = 2_000  # the page waits at most this long for its candidates before offering
    consent_interval_s: float = 5.0  # s between ICE consent checks (RFC 7675); aioice's default
    consent_failures: int = (
        6  # unanswered checks in a row that end the call: ~(interval + 0.5 s) each (~33 s)
    )
    max_remote_candidates: int = (
        16  # ICE candidates read from an offer (a browser sends 2-10); the rest are ignored
    )


@dataclass(frozen=True)
class TurnDetectionConfig:
    threshold: float = 0.5  # silero speech probability that counts as speech (Realtime default)
    prefix_padding_ms: int = 300  # audio kept from before speech onset (Realtime default)
    silence_duration_ms: int = 500  # silence that ends a turn (Realtime default)
    min_speech_ms: int = 250  # shorter speech is a false start: dropped, no reply
    min_interrupt_ms: int = 200  # speech over the assistant must last this long to cut it off (coughs)
    echo_guard: bool = False  # clients without echo cancellation: our own reply coming back is not speech
    create_response: bool = True  # answer automatically when a spoken turn ends (Realtime default)
    interrupt_response: bool = True  # user speech interrupts the assistant (Realtime default)


@dataclass(frozen=True)
class ResponderConfig:
    kind: str = "glm4voice"  # "glm4voice" (the speech model) or "echo" (mic check: plays your turn back)


@dataclass(frozen=True)
class LimitsConfig:
    max_calls: int = 32  # concurrent calls; the next one gets 503 + Retry-After
    retry_after_s: int = 5  # Retry-After sent with a 503
    max_event_bytes: int = 32_768  # largest data-channel message
    max_text_chars: int = 4_000  # typed user message
    max_instructions_chars: int = 4_000  # session instructions
    max_events_per_s: float = 20.0  # data-channel messages per second per call (sustained rate)
    event_burst: int = 60  # data-channel messages allowed at once above the rate
    max_expensive_events_per_s: float = (
        1.0  # response.create + instructions changes per s per call (engine prefill)
    )
    expensive_event_burst: int = 5  # of those, allowed at once above the rate
    inbound_flood_s: float = (
        10.0  # inbound audio over real time (excess dropped) this long ends the call; 0 = never
    )
    calls_per_minute_per_address: float = (
        30.0  # call offers + client secrets per client address; 0 = no limit
    )
    call_burst_per_address: int = 10  # offers allowed at once above that rate
    max_call_duration_s: float = 3_600.0  # a call is closed after this long; 0 = no limit
    idle_timeout_s: float = (
        300.0  # no user speech and no client event for this long closes the call; 0 = never
    )
    peer_timeout_s: float = (
        5.0  # no inbound audio packets and no event for this long: the peer is gone; 0 = off
    )
    max_turn_audio_s: float = 120.0  # one user turn's audio; longer speech is cut here and answered
    resume_window_s: float = (
        60.0  # a dropped WebRTC call's conversation is kept this long for a resume; 0 = off
    )
    max_parked_calls: int = 8  # dropped calls kept for a resume, in all; past it the oldest is closed
    max_parked_per_address: int = 2  # of those, per client address; past it that address's oldest goes
    connect_timeout_s: float = 20.0  # an answered offer whose peer has not connected by then is dropped
    penalty_strikes: float = 60.0  # weighted refusals (401/403/404/429, abusive calls) that block an
    # address (server/edge/penalties.py); 0 = never block
    penalty_decay_per_s: float = 1.0  # strikes forgiven per second
    penalty_s: float = 5.0  # the first block; each new one within 10 min lasts twice as long
    penalty_max_s: float = 120.0  # the longest block


@dataclass(frozen=True)
class AuthConfig:
    api_key: str = (
        ""  # long-lived key for `Authorization: Bearer`; "" = no auth (set it via GLM4VOICE_AUTH_API_KEY)
    )
    client_secret_ttl_s: int = (
        600  # default lifetime of a client secret minted by /v1/realtime/client_secrets
    )
    max_client_secret_ttl_s: int = 7_200  # the longest lifetime a mint request may ask for
    page_secrets: bool = False  # the served page may mint its own client secret from a same-origin request


@dataclass(frozen=True)
class LoggingConfig:
    format: str = "text"  # "text" or "json" (one object per line, with call_id)
    log_user_content: bool = False  # log user text (typed messages, instructions); never on in production


@dataclass(frozen=True)
class MetricsConfig:
    loop_lag_interval_ms: int = 50  # how often the event-loop lag probe wakes
    loop_lag_window: int = 1_200  # probe samples kept for the p99 in /health (1 min at 50 ms)


@dataclass(frozen=True)
class Config:
    http: HttpConfig = field(default_factory=HttpConfig)
    webrtc: WebRTCConfig = field(default_factory=WebRTCConfig)
    turn_detection: TurnDetectionConfig = field(default_factory=TurnDetectionConfig)
    responder: ResponderConfig = field(default_factory=ResponderConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    model: EngineConfig = field(default_factory=EngineConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    transcription: TranscriptionConfig = field(default_factory=TranscriptionConfig)


def _convert(value: object, annotation: object, where: str) -> object:
    """Coerce a TOML or environment value to the field's type, with an error that names `where`."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in {
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        }:
            return value.strip().lower() in {"1", "true", "yes", "on"}
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
    elif annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
    raise ValueError(
        f"config {where}: {value!r} is not a valid {getattr(annotation, '__name__', annotation)}"
    )


def _build_section(cls: type, values: Mapping[str, object], where: str) -> object:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"config {where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    kwargs = {name: _convert(value, hints[name], f"{where}.{name}") for name, value in values.items()}
    return cls(**kwargs)


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, object]] | None = None,
) -> Config:
    """Read `path` (TOML; None = defaults), then env overrides, then explicit `overrides` (CLI flags)."""
    env = os.environ if env is None else env
    raw: dict[str, dict[str, object]] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ValueError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config file {path} is not valid TOML: {exc}") from None
    sections = {f.name: f for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ValueError(f"config {path}: unknown section(s) [{'], ['.join(unknown)}]")
    for name, value in raw.items():
        if not isinstance(value, dict):
            raise ValueError(f"config {path}: [{name}] must be a table")
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        rest = key[len(ENV_PREFIX) :].lower()
        section = next((s for s in sorted(sections, key=len, reverse=True) if rest.startswith(s + "_")), None)
        if section is None:
            continue  # GLM4VOICE_PARITY_DIR and friends belong to other tools
        raw.setdefault(section, {})[rest[len(section) + 1 :]] = value
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    built = {name: _build_section(hints[name], raw.get(name, {}), f"[{name}]") for name in sections}
    # One LM KV slot per admitted call, reserved at start (pipeline/engine/models.py memory plan).
    built["model"] = dataclasses.replace(built["model"], max_calls=built["limits"].max_calls)
    config = Config(**built)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Range checks that a type alone cannot express."""
    td = config.turn_detection
    if not 0.0 < td.threshold < 1.0:
        raise ValueError(f"config [turn_detection].threshold must be in (0, 1), got {td.threshold}")
    for name in ("prefix_padding_ms", "silence_duration_ms", "min_speech_ms", "min_interrupt_ms"):
        if getattr(td, name) < 0:
            raise ValueError(f"config [turn_detection].{name} must be >= 0")
    if config.responder.kind not in {"echo", "glm4voice"}:
        raise ValueError(
            f"config [responder].kind must be 'echo' or 'glm4voice', got {config.responder.kind!r}"
        )
    if not 0 <= config.webrtc.receive_jitter_frames <= 8:
        raise ValueError("config [webrtc].receive_jitter_frames must be in 0..8")
    if not 0 < config.http.port < 65536 and config.http.port != 0:
        raise ValueError(f"config [http].port {config.http.port} is out of range")
    h = config.http
    if h.header_timeout_s <= 0 or h.body_timeout_s <= 0:
        raise ValueError("config [http].header_timeout_s and body_timeout_s must be > 0")
    if not 1 <= h.max_connections_per_address <= h.max_connections:
        raise ValueError("config [http].max_connections_per_address must be in [1, max_connections]")
    if config.limits.max_calls < 1:
        raise ValueError("config [limits].max_calls must be >= 1")
    lim = config.limits
    for name in (
        "max_events_per_s",
        "calls_per_minute_per_address",
        "max_call_duration_s",
        "idle_timeout_s",
        "peer_timeout_s",
        "max_turn_audio_s",
        "connect_timeout_s",
        "inbound_flood_s",
        "resume_window_s",
        "penalty_strikes",
        "penalty_decay_per_s",
    ):
        if getattr(lim, name) < 0:
            raise ValueError(f"config [limits].{name} must be >= 0")
    if lim.penalty_strikes > 0 and not 0 < lim.penalty_s <= lim.penalty_max_s:
        raise ValueError("config [limits].penalty_s must be > 0 and <= penalty_max_s")
    if lim.max_events_per_s <= 0 or lim.event_burst < 1 or lim.call_burst_per_address < 1:
        raise ValueError("config [limits].max_events_per_s must be > 0 and the bursts >= 1")
    if lim.max_expensive_events_per_s <= 0 or lim.expensive_event_burst < 1:
        raise ValueError(
            "config [limits].max_expensive_events_per_s must be > 0 and expensive_event_burst >= 1"
        )
    if config.http.trusted_proxy_hops < 1:
        raise ValueError("config [http].trusted_proxy_hops must be >= 1")
    if config.webrtc.max_remote_candidates < 1:
        raise ValueError("config [webrtc].max_remote_candidates must be >= 1")
    if config.webrtc.consent_interval_s <= 0 or config.webrtc.consent_failures < 1:
        raise ValueError("config [webrtc].consent_interval_s must be > 0 and consent_failures >= 1")
    auth = config.auth
    if not 10 <= auth.client_secret_ttl_s <= auth.max_client_secret_ttl_s:
        raise ValueError("config [auth].client_secret_ttl_s must be in [10, max_client_secret_ttl_s]")
    if auth.api_key and len(auth.api_key) < 16:
        raise ValueError("config [auth].api_key must be at least 16 characters")
    if config.logging.format not in {"text", "json"}:
        raise ValueError(f"config [logging].format must be 'text' or 'json', got {config.logging.format!r}")
    if config.http.shutdown_grace_s < 0:
        raise ValueError("config [http].shutdown_grace_s must be >= 0")
    if config.model.lm_backend not in {"local", "vllm"}:
        raise ValueError(
            f"config [model].lm_backend must be 'local' or 'vllm', got {config.model.lm_backend!r}"
        )
    config.transcription.check()
    vllm = config.vllm
    if not vllm.url.startswith(("http://", "https://")):
        raise ValueError(f"config [vllm].url must start with http:// or https://, got {vllm.url!r}")
    if min(vllm.connect_timeout_s, vllm.read_timeout_s, vllm.probe_interval_s) <= 0:
        raise ValueError("config [vllm] timeouts and probe_interval_s must be > 0")
