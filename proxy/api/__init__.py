"""One module per endpoint family, each: parse -> router -> render."""
