"""The config: every field's default (defaults) and its validation."""
