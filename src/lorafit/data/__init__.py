"""Data: where rows come from (`sources`), their formats (`formats`), tokenizing and masking
(`encoding`), batch order and splits (`sampling`), and the LightningDataModules (`lm` for causal
LM, `classification`). Only `lm` and `classification` import Lightning, so the tools
(`lorafit generate`) can use `encoding` without it.
"""
