"""Revenue tracking: the ``RevenueTracker`` interface, its backends (in-process with an outcome
log, Redis), their typed configs and the registry that builds one from a config."""
