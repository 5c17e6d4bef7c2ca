"""Everything under OUT: the catalog's Delta tables and their commits, masks, run records, heartbeats, the
readers of OUT, upkeep and migration, assembly of cases, QC pictures (docs/ARCHITECTURE.md)."""
