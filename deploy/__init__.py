"""Deploy: the checkpoint format (`deploy.checkpoint`), policies saved and loaded through it
(`deploy.policy`), the base model (`deploy.base_model`), and the registry, promotion, canary
and rollback built on them; every failure is a `deploy.errors.DeployError`.

Imports only `feedback/` (see DESIGN.md's import rule). Importing this package is cheap:
torch and transformers load only when a model is actually saved or loaded (`deploy.policy`).
"""
