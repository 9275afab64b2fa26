"""The config schema: defaults and presets, and the one validation of a config."""
