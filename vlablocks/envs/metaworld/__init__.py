"""Meta-World (v3): tasks, rendering, the environment and scripted demos."""
