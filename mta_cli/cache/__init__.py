"""The extraction cache: layout, writing, reading and inspection."""

from mta_cli.cache.reader import CachedSample, CacheReader, ShardData
from mta_cli.cache.store import CacheError

__all__ = ["CacheError", "CacheReader", "CachedSample", "ShardData"]
