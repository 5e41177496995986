"""Flywheel's server: the chat page, the websocket /ws, the OpenAI-compatible API and the REST
API, on top of the feedback store and a model engine. `python -m server` runs it."""
