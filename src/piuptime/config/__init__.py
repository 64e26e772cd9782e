"""Configuration: the YAML schema, loading with positions, units, ``${ENV}`` interpolation.

``config`` is plain data: it imports nothing else of piuptime. See ``docs/configuration.md``.
"""

from .load import ConfigError, ConfigIssue, load_config, parse_config, validate_main
from .schema import Config

__all__ = ["Config", "ConfigError", "ConfigIssue", "load_config", "parse_config", "validate_main"]
