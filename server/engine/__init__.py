"""Engines: what generates the tokens. `base` is the interface both implement; `local` runs
the model in process (batched, streaming); `remote` talks to another server.

Importing this package is cheap: the engines (and torch) load only when imported themselves.
"""
