"""Online serving: one request's path (features -> retrieval -> routing -> scoring -> ranking) and
the subpackages by concern: ``edge`` (gRPC), ``routing`` (how much model a request gets),
``revenue`` (what each inference earned) and ``commands`` (the ``valuerank`` subcommands)."""
