"""Closed-loop evaluation over a small environment protocol: the chunk-executing policy
wrapper, the env-agnostic rollout, the process pool and the video writer."""
