"""Live load against a running server: the open-loop generator, its traffic, reports and capacity search."""
