"""The package version: the one place it is written (``pyproject.toml`` reads it from here).

Modules inside the package import it from here, never from the package root, so nothing below
the root imports the root.
"""

__version__ = "0.1.0"
