"""vlablocks.blocks."""
