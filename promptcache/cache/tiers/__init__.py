"""Tiers below the device pool: host memory, local disk, Redis (one small interface, ``base.Tier``)."""
