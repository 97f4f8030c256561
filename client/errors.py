"""Exit codes a supervisor can act on, and the errors that carry them (one clear line each)."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    USAGE = 2  # argparse's own code for a bad command line
    SERVER_REFUSED = (
        3  # the server answered but would not take the call (busy, bad offer, shutting down too long)
    )
    AUTH = 4  # 401/403: a missing, wrong or expired API key or client secret
    NETWORK = 5  # the server could not be reached, or the call was lost and did not come back in time
    AUDIO_DEVICE = (
        6  # PortAudio missing, no such microphone/speaker, or a WAV file that cannot be read/written
    )


class CallError(Exception):
    """An error that ends the client; `str()` is the one line printed for it."""

    code: ExitCode = ExitCode.NETWORK
    retryable = False


class ServerRefused(CallError):
    code = ExitCode.SERVER_REFUSED

    def __init__(
        self, message: str, status: int = 0, error_code: str = "", retry_after_s: float | None = None
    ):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.retry_after_s = retry_after_s
        # busy, loading, restarting: worth asking again within the reconnect window
        self.retryable = status in (429, 503)


class AuthError(CallError):
    code = ExitCode.AUTH


class NetworkError(CallError):
    code = ExitCode.NETWORK
    retryable = True


class AudioDeviceError(CallError):
    code = ExitCode.AUDIO_DEVICE
