"""The command line: asyncckpt ls/gc/demo and the bench."""
