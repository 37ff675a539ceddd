"""Routing: the ``Router`` interface the pipeline sees, the policies behind it (fixed, static
per-surface tables, value-aware), its lambda controller and its value model."""
