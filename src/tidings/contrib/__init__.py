"""Integrations with optional libraries, each behind its extra (``tidings[fastapi]``...)."""
