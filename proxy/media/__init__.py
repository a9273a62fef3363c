"""Images as data: input images decoded at the scale a route needs."""
