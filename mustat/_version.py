"""The version of mustat, in a module of its own so that any module may record it
(:func:`mustat.runs.versions`) without importing the package that imports everything."""

__version__ = "0.7.0"
