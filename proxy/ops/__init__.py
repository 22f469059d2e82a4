"""Operating the daemon: structured logs, Prometheus metrics, file-change watching,
concurrency limits, background-task supervision and progress display for the CLI tools."""
