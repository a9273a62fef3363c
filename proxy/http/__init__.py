"""The HTTP side of the proxy: what reaches the wire and the logs from malformed client traffic."""
