"""Reusable, retryable building blocks of job flows."""
