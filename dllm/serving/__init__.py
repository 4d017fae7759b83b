"""The OpenAI-compatible server (``serve.py``): HTTP API, request checks, streamed text, the generation thread."""
