"""Traces and structured logs (the Prometheus metrics are proxy/metrics.py)."""
