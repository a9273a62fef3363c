"""The HTTP side: the server, reading bodies, sending answers, the request log line, errors."""
