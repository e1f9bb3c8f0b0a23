"""vlablocks."""
