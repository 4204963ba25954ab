"""prompt-pipeline: batch prompts through OpenRouter-compatible chat APIs, durably and cheaply."""

__version__ = "0.1.0"
