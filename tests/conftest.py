"""Settings for the whole test session, made before any test module imports a library."""

import os

# The suite never reaches a hub: a Hub dataset id that is not in the cache fails at once, as on a
# machine without network, instead of waiting for connection time-outs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
