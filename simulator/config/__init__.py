"""The configuration room: ``schema`` (the frozen dataclasses, ``ConfigError``) and ``toml`` (reading, writing,
``--set`` overrides). Validation against the registries is ``simulator.experiment``."""
