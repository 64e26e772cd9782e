"""piuptime: API gateway, AI gateway and fleet watch in one small process."""

__version__ = "0.1.0"
