"""maskc.runtime: executing plans with torch (not built yet; see README)."""
