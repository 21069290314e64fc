"""Run-level helpers: configuration, artifact paths, distribution, I/O, logging, engines."""
