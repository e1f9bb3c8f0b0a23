"""Training, one concern per module:

- :mod:`.config`: ``TrainConfig``, the learning-rate schedule, a recipe's ``train:`` section.
- :mod:`.groups`: AdamW parameter groups by block, freezing, normalisation from dataset stats.
- :mod:`.sampler`: the per-epoch data order across processes and the seeds of the random streams.
- :mod:`.ema`: the moving average of the trainable weights.
- :mod:`.metrics`: ``metrics.csv`` (writer and the one reader), TensorBoard, ``curves.png``.
- :mod:`.signals`: SIGTERM -> stop after this step.
- :mod:`.accelerator`: the HF accelerate ``Accelerator`` of a run.
- :mod:`.checkpoint`: the checkpoint directory, its publication and recovery, the policy's weights.
- :mod:`.state`: the optimizer and RNG state that makes a resume exact.
- :mod:`.trainer`: ``Trainer``, the loop.
- :mod:`.workflow`: ``vlablocks train``: recipe + dataset -> run directory.
"""
