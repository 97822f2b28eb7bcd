"""The transcription pipeline: its steps and the workers that run them."""
