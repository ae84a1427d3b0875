"""``redrafter-serve``: an OpenAI-compatible HTTP server over the in-flight scheduler."""

from .app import ServeState, create_app

__all__ = ["ServeState", "create_app"]
