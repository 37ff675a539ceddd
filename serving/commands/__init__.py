"""The serving subcommands of ``valuerank``: ``serve``, ``recommend`` and ``routing-stats``, each
a module with ``main(argv) -> int``.

Each is a process's entry point, so this package sets the OpenMP wait policy before any of them
imports torch (``embeddings.omp``: idle OpenMP workers sleep instead of spinning on cores the
event loop and the load generator need)."""

from embeddings import omp  # noqa: F401 - for its effect, before torch
