"""The lab's web page and JSON API: ``create_app(ens_dir, ...)``."""

from .app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
