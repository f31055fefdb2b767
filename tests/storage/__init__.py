"""Storage backends: the conformance suite per backend, the wrappers, lazy imports."""
