"""vlablocks.recipes."""
