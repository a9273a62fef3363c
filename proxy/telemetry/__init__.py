"""Metrics, traces and structured logs about the proxy at work."""
