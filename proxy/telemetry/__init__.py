"""Metrics about the proxy at work."""
