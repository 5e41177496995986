"""Engines: what generates the tokens. `base` is the interface both implement; `local` runs
the model in process (batched, streaming); `remote` talks to another server (over
`remote_http`, with vLLM's runtime LoRA admin in `remote_lora`).

Importing this package is cheap: the engines (and torch) load only when imported themselves.
"""
