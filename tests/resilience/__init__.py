"""Faults, crashes, concurrency, fuzzing, soak and integrity: the manager under stress."""
