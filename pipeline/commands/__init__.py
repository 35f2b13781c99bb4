"""One module per ``ddpt`` subcommand: each turns parsed arguments into a configuration, picks
the backends (Ray or this process) and calls the library. ``pipeline.cli`` only parses."""
