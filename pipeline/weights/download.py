"""`glm4voice download [--dir DIR]`: fetch the three official GLM-4-Voice checkpoints and the Whisper one.

Uses huggingface_hub's `snapshot_download`, which shows progress bars, resumes interrupted files
(partial downloads are kept under `DIR/<name>/.cache/huggingface`) and honours `HF_ENDPOINT` (a
mirror) and `HF_TOKEN`. The layout it writes is what `[model] weights_dir` expects:

    DIR/glm-4-voice-tokenizer/   config.json, preprocessor_config.json, model.safetensors
    DIR/glm-4-voice-9b/          config.json, model-0000k-of-00004.safetensors, tokenizer.model, ...
    DIR/glm-4-voice-decoder/     config.yaml, flow.pt, hift.pt
    DIR/whisper-large-v3-turbo/  the transcription stage's default ([transcription] model)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# (repo id, sub-folder of DIR, approximate download size) — sizes from the Hugging Face file lists
CHECKPOINTS: tuple[tuple[str, str, str], ...] = (
    ("THUDM/glm-4-voice-tokenizer", "glm-4-voice-tokenizer", "1.5 GB"),
    ("THUDM/glm-4-voice-9b", "glm-4-voice-9b", "19 GB"),
    ("THUDM/glm-4-voice-decoder", "glm-4-voice-decoder", "0.5 GB"),
    ("openai/whisper-large-v3-turbo", "whisper-large-v3-turbo", "1.6 GB"),
)
DEFAULT_DIR = "weights"
# The 9B repo also carries the remote modeling code; our own implementation does not need it.
IGNORE_PATTERNS = ["*.py", "*.md", ".gitattributes"]


class DownloadError(RuntimeError):
    """A checkpoint could not be fetched; the message says why and what to do."""


def _offline_message(repo_id: str, endpoint: str, cause: BaseException) -> str:
    return (
        f"could not download {repo_id} from {endpoint}: {type(cause).__name__}: {cause}\n"
        "This machine looks offline or cannot reach the Hugging Face hub. Options:\n"
        "  - set HF_ENDPOINT to a reachable mirror (for example HF_ENDPOINT=https://hf-mirror.com),\n"
        "  - copy the three checkpoint folders onto this machine and set [model] weights_dir,\n"
        "  - or run without real weights: `glm4voice serve` uses the demo weights.\n"
        "Partial files are kept; running the same command again resumes them."
    )


def download_all(target_dir: Path, *, token: str | None = None) -> dict[str, Path]:
    """Fetch every checkpoint into `target_dir/<name>`; returns name -> local folder."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    endpoint = constants.ENDPOINT  # HF_ENDPOINT, read by huggingface_hub at import
    folders: dict[str, Path] = {}
    for repo_id, name, size in CHECKPOINTS:
        local_dir = target_dir / name
        print(f"[download] {repo_id} (~{size}) -> {local_dir}", flush=True)
        try:
            snapshot_download(
                repo_id=repo_id,
                local_dir=str(local_dir),
                token=token,
                ignore_patterns=IGNORE_PATTERNS,
            )
        except LocalEntryNotFoundError as exc:  # offline mode or the hub unreachable
            raise DownloadError(_offline_message(repo_id, endpoint, exc)) from exc
        except HfHubHTTPError as exc:
            raise DownloadError(
                f"the hub refused {repo_id}: {exc}\n"
                "If the repository needs a login, set HF_TOKEN (https://huggingface.co/settings/tokens)."
            ) from exc
        except OSError as exc:  # connection refused / DNS failure surface as OSError subclasses
            raise DownloadError(_offline_message(repo_id, endpoint, exc)) from exc
        except Exception as exc:  # httpx/requests connection errors are not OSError subclasses
            if "connect" in type(exc).__name__.lower() or "timeout" in type(exc).__name__.lower():
                raise DownloadError(_offline_message(repo_id, endpoint, exc)) from exc
            raise
        folders[name] = local_dir
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="glm4voice download",
        description="Download the official GLM-4-Voice checkpoints (tokenizer, 9B LM, decoder) and Whisper "
        "large-v3-turbo for transcripts (~23 GB).",
    )
    parser.add_argument("--dir", default=DEFAULT_DIR, help=f"target folder (default: ./{DEFAULT_DIR})")
    args = parser.parse_args(argv)
    target = Path(args.dir).expanduser().resolve()
    target.mkdir(parents=True, exist_ok=True)
    try:
        download_all(target, token=os.environ.get("HF_TOKEN") or None)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"[download] done. Serve with: GLM4VOICE_MODEL_WEIGHTS_DIR={target} glm4voice serve\n"
        f'           (or set weights_dir = "{target}" in the [model] section of config.toml)'
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
