"""Storage tiers below the embedding cache, in lookup order: host memory -> Redis Cluster -> RocksDB."""

from hps_core.tiers.base import Tier, TierStats

__all__ = ["Tier", "TierStats"]
