"""Accuracy measures for a diffusion LLM and its quantized versions (the accuracy benchmark's parts).

* ``masked_token_perplexity``: mask exactly ``round(r·L)`` positions of each window (the same
  positions for every model: seeded), and take ``exp`` of the mean cross-entropy on them.
* ``unigram_perplexity``: the same text under an add-one unigram model of the train split, the
  floor a model that learned nothing from context would reach on fully masked windows.
* ``follow_trajectory``: greedy sampling that records the final hidden state at every step;
  ``agreement`` and ``hidden_state_error`` compare two runs (each model on its own trajectory, so
  errors that change which tokens get committed accumulate, as in the paper's figure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stq_compiler.sampling import generate


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """The texts' token ids, documents separated by the tokenizer's end-of-sequence token."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token to separate documents")
    ids: list[int] = []
    for encoding in tokenizer(texts)["input_ids"]:
        ids.extend(encoding)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, length: int, count: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [N, length] of a 1-D stream; ``count`` of them evenly spaced, if given."""
    n = stream.numel() // length
    if n == 0:
        raise ValueError(f"a stream of {stream.numel()} tokens holds no window of {length}")
    all_windows = stream[: n * length].view(n, length)
    if count is None or count >= n:
        return all_windows
    return all_windows[torch.linspace(0, n - 1, count).round().long()]


def _logits(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


@torch.no_grad()
def masked_token_perplexity(
    model, ids: torch.Tensor, mask_ratio: float, mask_id: int, seed: int = 0, batch_size: int = 32, shift_logits: bool = False
) -> dict:
    """Perplexity on exactly ``max(1, round(mask_ratio·L))`` masked positions per window."""
    if not 0 < mask_ratio <= 1:
        raise ValueError(f"mask_ratio must be in (0, 1], got {mask_ratio}")
    n, length = ids.shape
    k = max(1, round(mask_ratio * length))
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, length, generator=gen)
    masked = torch.zeros(n, length, dtype=torch.bool)
    masked.scatter_(1, scores.topk(k, dim=1).indices, True)
    device = next((p.device for p in _parameters(model)), ids.device)
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        target = ids[start : start + batch_size].to(device)
        where = masked[start : start + batch_size].to(device)
        logits = _logits(model(torch.where(where, torch.full_like(target, mask_id), target))).double()
        if shift_logits:  # Dream: output i-1 predicts token i
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        total += float(ce[where.reshape(-1)].sum())
        count += int(where.sum())
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count}


def _parameters(model):
    inner = getattr(model, "_orig_mod", model)
    return inner.parameters() if isinstance(inner, torch.nn.Module) else iter(())


def unigram_perplexity(train: torch.Tensor, test: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of ``test`` under the add-one unigram distribution of ``train``."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1
    logp = counts.log() - counts.sum().log()
    return math.exp(-float(logp[test].mean()))


@dataclass
class Trajectory:
    tokens: torch.Tensor  # [B, P + G] the final sequences
    hidden: list[torch.Tensor]  # per step: the final hidden state [B, P + G, d] (float16, on the model's device)
    prompt_length: int


@torch.no_grad()
def follow_trajectory(
    model, prompts: torch.Tensor, mask_id: int, gen_length: int, steps: int, block_length: int, shift_logits: bool = False
) -> Trajectory:
    """Greedy low-confidence sampling with ``model(x, output_hidden_states=True)``, recording every
    step's final hidden state."""
    hidden: list[torch.Tensor] = []

    def call(x):
        return model(x, output_hidden_states=True)

    def record(step, x, output):
        hidden.append(output.hidden_states[-1].detach().to(torch.float16))

    tokens = generate(
        call, prompts, gen_length=gen_length, steps=steps, block_length=block_length, temperature=0.0,
        mask_token_id=mask_id, shift_logits=shift_logits, on_step=record,
    )
    return Trajectory(tokens, hidden, prompts.shape[1])


def agreement(reference: Trajectory, test: Trajectory) -> float:
    """Share of generated positions where both runs committed the same token."""
    p = reference.prompt_length
    return float((reference.tokens[:, p:] == test.tokens[:, p:]).double().mean())


def hidden_state_error(reference: Trajectory, test: Trajectory) -> list[float]:
    """Per step: mean squared difference of the final hidden states, relative to the reference's
    mean square (so the figure does not depend on the hidden states' scale)."""
    errors = []
    for ref, out in zip(reference.hidden, test.hidden, strict=True):
        ref, out = ref.double(), out.double()
        errors.append(float((out - ref).pow(2).mean() / ref.pow(2).mean()))
    return errors


__all__ = [
    "token_stream",
    "windows",
    "masked_token_perplexity",
    "unigram_perplexity",
    "Trajectory",
    "follow_trajectory",
    "agreement",
    "hidden_state_error",
]
