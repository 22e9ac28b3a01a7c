"""maskc.codegen: kernel specs, jinja2 templates and ahead-of-time builds (not built yet; see README)."""
