"""The assembled policy: :class:`VLA` (prefix builder + denoiser + flow-matching head), its
config, normalisation, batch keys and checks, and training-time augmentation."""
