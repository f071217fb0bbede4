"""Command-line tools around the apps: fedpipe-bench (suites and reports), fedpipe-eval, fedpipe-automation."""
