"""vlablocks.encoders."""
