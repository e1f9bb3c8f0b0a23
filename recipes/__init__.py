"""vlablocks.recipes: YAML recipes, their loader and the block registry.

Empty until the recipes work lands; blocks are composed by hand meanwhile (see README.md).
"""
