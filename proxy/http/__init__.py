"""The HTTP side: the server, reading bodies, sending answers, request ids and the request log line, CPU work
kept off the event loop, and malformed client traffic kept out of the answers and the logs."""
