"""xsel: choose which K medical images to label.

Plugins import the hook marker from here: ``from xsel import hookimpl``.
"""

from xsel.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]
