"""One module per endpoint family, each: parse -> router -> render. Below them: context.py (what a request
carries), gateway.py (what the proxy owns), serving.py (route, then render)."""
