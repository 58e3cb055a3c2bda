"""Where a run reports: the W&B run, the metric writers (W&B, TensorBoard, the log), the `.wandb` reader, the token.

Imports `config` below it. `writers` (and W&B, TensorBoard's protos) load only when a run starts writing; no
module here imports TensorFlow.
"""
