"""Which route serves a request: the router (retries, fallback, breakers), key policy, in-flight work."""
