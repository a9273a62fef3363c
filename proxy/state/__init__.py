"""What outlives a request: idempotency records, shared counters, the image store."""
