"""Which network addresses and host names a fetch of a URL nobody vetted may reach (SSRF rules)."""
