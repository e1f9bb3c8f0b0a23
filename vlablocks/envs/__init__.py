"""Environments behind the evaluation protocol (:mod:`vlablocks.eval`); Meta-World is one."""
