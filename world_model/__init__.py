"""maskc.world_model: the MAGI-1-style video world model (not built yet; see README)."""
