"""vlablocks.heads."""
