"""A small, seeded fine-tuning loop for sequence classifiers (the demo's stand-in for downloading fine-tunes)."""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm


def fine_tune_classifier(model, tokenizer, texts: Sequence[str], labels: Sequence[int], *, epochs: int = 2,
                         learning_rate: float = 2e-4, batch_size: int = 32, max_length: int = 64, seed: int = 0,
                         freeze_word_embeddings: bool = True, progress: bool = True):
    """AdamW with linear decay over `epochs` passes in a seeded order; the word embeddings stay frozen by default
    (fast on a CPU, and the fine-tunes of one base then share them). Returns the model in eval mode."""
    if len(texts) != len(labels) or not len(texts):
        raise ValueError(f"texts and labels must be non-empty and of one length; got {len(texts)} and {len(labels)}")
    generator = torch.Generator().manual_seed(seed)
    embeddings = model.get_input_embeddings()
    frozen = [embeddings.weight] if freeze_word_embeddings else []
    for p in frozen:
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.01)
    steps = epochs * ((len(texts) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / steps))
    labels = torch.as_tensor(labels)
    model.train()
    with tqdm(total=steps, disable=not progress, desc="Fine-tuning", unit="step") as bar:
        for _ in range(epochs):
            order = torch.randperm(len(texts), generator=generator)
            for start in range(0, len(texts), batch_size):
                rows = order[start:start + batch_size]
                batch = tokenizer([texts[i] for i in rows.tolist()], padding=True, truncation=True,
                                  max_length=max_length, return_tensors="pt")
                loss = model(**batch, labels=labels[rows]).loss
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    for p in frozen:
        p.requires_grad_(True)
    return model.eval()


@torch.no_grad()
def predict(model, tokenizer, texts: Sequence[str], *, batch_size: int = 64, max_length: int = 64,
            hidden: bool = False):
    """Predicted classes [N] (and, with hidden=True, the final [CLS] hidden states [N, d]), in the order of
    `texts`. Batches are formed from texts of similar length (sorted by characters), so little is padding."""
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    predictions, states = [], []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer([texts[i] for i in order[start:start + batch_size]], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        out = model(**batch, output_hidden_states=hidden)
        predictions.append(out.logits.argmax(-1))
        if hidden:
            states.append(out.hidden_states[-1][:, 0])
    inverse = torch.empty(len(texts), dtype=torch.long)
    inverse[torch.as_tensor(order, dtype=torch.long)] = torch.arange(len(texts))
    predictions = torch.cat(predictions)[inverse] if len(texts) else torch.empty(0, dtype=torch.long)
    if not hidden:
        return predictions
    return predictions, (torch.cat(states)[inverse] if len(texts) else torch.empty(0))


def correct(model, tokenizer, texts: Sequence[str], labels: Sequence[int], **options) -> torch.Tensor:
    """[N] bool: whether each example is classified right."""
    return predict(model, tokenizer, texts, **options) == torch.as_tensor(labels)


def accuracy(model, tokenizer, texts: Sequence[str], labels: Sequence[int], **options) -> float:
    return float(correct(model, tokenizer, texts, labels, **options).float().mean())
