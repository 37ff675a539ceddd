"""The serving subcommands of ``valuerank``: ``serve``, ``recommend`` and ``routing-stats``, each
a module with ``main(argv) -> int``."""
