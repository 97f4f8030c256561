"""Settings of the transcription stage (the `[transcription]` section of config.toml). Torch-free.

The server composes this into its config; env overrides use GLM4VOICE_TRANSCRIPTION_<KEY>.
"""

from __future__ import annotations

from dataclasses import dataclass

ENABLED_VALUES = ("auto", "on", "off")
# The languages of Whisper's multilingual checkpoints, as their language tokens name them (<|en|>, ...; the
# generation config's lang_to_id): what a client may set as a session's transcription language.
WHISPER_LANGUAGES = tuple(
    (
        "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr "
        "bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn "
        "yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su "
        "yue"
    ).split()
)


@dataclass(frozen=True)
class TranscriptionConfig:
    # A Hugging Face repo id (found as `[model] weights_dir/<repo name>`, where `glm4voice download` puts it)
    # or a local folder in the transformers format.
    model: str = "openai/whisper-large-v3-turbo"
    enabled: str = "auto"  # "auto": on with real weights, off with demo weights; "on"; "off"
    device: str = ""  # "" = the engine's device; else "cpu", "cuda", "cuda:1"
    dtype: str = "auto"  # "auto" (float16 on GPU, float32 on CPU), "float32", "bfloat16", "float16"

    def wanted(self, real_weights: bool) -> bool:
        """Whether the stage is loaded, given the engine's weights."""
        return self.enabled == "on" or (self.enabled == "auto" and real_weights)

    def check(self) -> None:
        if self.enabled not in ENABLED_VALUES:
            raise ValueError(f"config [transcription].enabled must be one of {', '.join(ENABLED_VALUES)}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError("config [transcription].dtype must be auto, float32, bfloat16 or float16")
        if not self.model:
            raise ValueError("config [transcription].model must name a checkpoint")
