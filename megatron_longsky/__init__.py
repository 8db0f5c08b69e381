"""megatron_longsky: the LongSkywork long-context recipe on megatron-core."""

__version__ = "0.1.0"
