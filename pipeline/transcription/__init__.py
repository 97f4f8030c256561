"""transcription stage: Whisper on each committed spoken turn, off the path to first audio."""
