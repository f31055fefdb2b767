"""Helpers the tests share: fault-injecting S3 proxy, subprocess children, deep asserts."""
