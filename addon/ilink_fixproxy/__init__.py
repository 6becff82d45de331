"""ilink-fixproxy: repairs stale-context_token failures on the iLink bot API."""

__version__ = "0.1.0"
