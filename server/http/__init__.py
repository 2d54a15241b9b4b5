"""The OpenAI-compatible HTTP door (docs/http.md): FastAPI routes (door.py), request schemas and their
conversion to engine requests, rendering of replies and streams, error bodies, and the uvicorn server."""
