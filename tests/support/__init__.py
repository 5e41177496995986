"""Test support shared across the test tree (not tests themselves)."""
