"""Small file helpers shared by every layer: atomic writes (:mod:`.atomic`) and checkpoint
manifests with safetensors reading (:mod:`.manifest`)."""
