"""Training: the trainer, losses, joint training, distillation, train configs, the training benchmark and
the evidence experiments. Imported only by the training commands (docs/architecture.md, "Import rules").
"""
