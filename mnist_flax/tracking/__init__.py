"""Where a run reports: the W&B run, the metric writers (W&B, TensorBoard, the log), the `.wandb` reader, the token.

Imports `config` below it. clu's writers import TensorFlow, so `writers` loads only when a run starts writing.
"""
