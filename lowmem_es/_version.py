"""The package version (one place: ``lowmem_es.__version__`` and checkpoints read it)."""

__version__ = "0.1.0"
