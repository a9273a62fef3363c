"""Which network addresses and host names a fetch of a URL nobody vetted may reach (SSRF rules), for
proxy/ and local_backend/ alike: the rules are in netguard.addresses."""
