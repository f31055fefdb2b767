"""asyncckpt's test-suite, by layer: unit/, storage/, manager/, resilience/, cli/; helpers in support/."""
