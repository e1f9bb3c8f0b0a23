"""Small file helpers shared by every layer: atomic writes (:mod:`.atomic`), checkpoint
manifests with safetensors reading (:mod:`.manifest`) and Hub repository ids (:mod:`.hub`)."""
