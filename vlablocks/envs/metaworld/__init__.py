"""Meta-World (v3): task tables (:mod:`.tasks`, no simulator needed), offscreen rendering
(:mod:`.render`), the environment of the evaluation protocol (:mod:`.env`) and scripted-expert
demos (:mod:`.demos`).

Only :mod:`.tasks` is imported here: the others need the optional ``sim`` extra
(metaworld, mujoco), imported when a module that needs it is.
"""

from vlablocks.envs.metaworld.tasks import (
    BUCKETS,
    DIFFICULTY,
    INSTRUCTIONS,
    MT10,
    STATE_LAYOUTS,
    layout_seed,
    state_layout,
)

#: the message of the ImportError raised when the ``sim`` extra is missing.
INSTALL_HINT = "vlablocks.envs.metaworld needs Meta-World: pip install 'vlablocks[sim]' (metaworld, mujoco, packaging, imageio)"

__all__ = ["BUCKETS", "DIFFICULTY", "INSTALL_HINT", "INSTRUCTIONS", "MT10", "STATE_LAYOUTS", "layout_seed", "state_layout"]
