"""Images in and out: sizes, input images, output emulation, partial images, image checks, fetching."""
