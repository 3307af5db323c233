"""Tasks: one LightningModule subclass each, named by the `task` config group's `_target_`.

`causal_lm.CausalLMModule` and `classification.ClassificationModule`; `base.LoRAModule` holds
what they share. Adding a task is a new module here and a `conf/task/NAME.yaml`.
"""
