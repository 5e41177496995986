"""The feedback store: PostgreSQL schema, migrations, the store API and export.

Imports none of server/, retrain/ or deploy/ (see DESIGN.md's import rule).
"""
