"""LLaDA's sampler: semi-autoregressive masked denoising with low-confidence remasking.

The sequence is prompt + `gen_length` [MASK] tokens. The generated part is split into blocks of
`block_length`, decoded left to right; each block gets `steps / num_blocks` denoising steps. A step
runs the whole sequence through the model once, predicts every position (greedy argmax, or
Gumbel-max sampling in float64 when temperature > 0), scores the predictions (softmax probability
of the chosen token, or uniform noise for "random" remasking), and commits the best-scoring
predictions at masked positions; positions after the current block never qualify. How many tokens
a step commits is fixed per row when the block starts: the block's masked count split evenly over
its steps, the remainder going to the first steps.

Every step calls `model(x)` on the same [batch, prompt_len + gen_length] shape, so a compiled
model compiles once. Follows `generate.py` of ML-GSAI/LLaDA (without classifier-free guidance).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

REMASKING = ("low_confidence", "random")


def _logits_of(output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model returned {type(output).__name__}; expected a tensor or an object with .logits")
    return logits


def _config_value(model: nn.Module, name: str) -> object:
    return getattr(getattr(model, "config", None), name, None)


def num_transfer_tokens(block_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, steps] tokens to commit per step: each row's masked count split evenly, remainder first."""
    count = block_masked.sum(dim=1, keepdim=True)
    step = torch.arange(steps, device=block_masked.device)
    return count // steps + (step < count % steps).long()


def _choose(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    # Gumbel-max in float64 (low-precision Gumbel noise degrades generation, arXiv:2409.02908).
    # argmax(exp(l) / (-log u)^T) as in LLaDA, computed in log space to avoid exp overflow.
    noise = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    return (logits.to(torch.float64) - temperature * torch.log(-torch.log(noise))).argmax(dim=-1)


def _confidence(
    logits: torch.Tensor, x0: torch.Tensor, remasking: str, generator: torch.Generator | None
) -> torch.Tensor:
    if remasking == "low_confidence":
        # softmax probability of the chosen token, in float64
        logits64 = logits.to(torch.float64)
        chosen = logits64.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
        return torch.exp(chosen - torch.logsumexp(logits64, dim=-1))
    return torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)


def _validate(
    prompt_ids: object, gen_length: int, steps: int, block_length: int, temperature: float, remasking: str
) -> None:
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2 or prompt_ids.dtype != torch.long:
        described = (
            f"a {prompt_ids.dim()}-D {prompt_ids.dtype} tensor"
            if isinstance(prompt_ids, torch.Tensor)
            else type(prompt_ids).__name__
        )
        raise ValueError(f"prompt_ids must be a 2-D torch.long tensor [batch, prompt_len], got {described}")
    for name, value in (("gen_length", gen_length), ("steps", steps), ("block_length", block_length)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(
            f"steps ({steps}) must be a multiple of the number of blocks "
            f"(gen_length / block_length = {num_blocks})"
        )
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if remasking not in REMASKING:
        raise ValueError(f"unknown remasking {remasking!r}; expected one of {REMASKING}")


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    gen_length: int = 128,
    steps: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    mask_token_id: int | None = None,
    shift_logits: bool | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    on_step: Callable[[int, torch.Tensor, object], None] | None = None,
) -> torch.Tensor:
    """Generate `gen_length` tokens after `prompt_ids` [B, P]; returns [B, P + gen_length] long.

    mask_token_id and shift_logits default to `model.config`'s (shift_logits: Dream's one-position
    logit shift, off when the config does not say). `model(x)` may return logits or an object
    with `.logits`, [B, L, vocab]. The sequence lives on prompt_ids' device; `generator` drives
    the Gumbel noise and "random" remasking. `on_step(step, x, output)`, if given, sees every
    step's input and the model's raw output (e.g. to follow hidden states along the trajectory).
    """
    _validate(prompt_ids, gen_length, steps, block_length, temperature, remasking)
    if mask_token_id is None:
        mask_token_id = _config_value(model, "mask_token_id")
        if mask_token_id is None:
            raise ValueError("mask_token_id was not given and model.config has no mask_token_id")
    if shift_logits is None:
        shift_logits = bool(_config_value(model, "shift_logits") or False)

    batch, prompt_len = prompt_ids.shape
    x = torch.full((batch, prompt_len + gen_length), int(mask_token_id), dtype=torch.long, device=prompt_ids.device)
    x[:, :prompt_len] = prompt_ids
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    position = torch.arange(x.shape[1], device=x.device)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="denoising")
    for block in range(num_blocks):
        block_start = prompt_len + block * block_length
        block_end = block_start + block_length
        transfer_counts = num_transfer_tokens(x[:, block_start:block_end] == mask_token_id, steps_per_block)
        for step in range(steps_per_block):
            masked = x == mask_token_id
            output = model(x)
            if on_step is not None:
                on_step(block * steps_per_block + step, x, output)
            logits = _logits_of(output)
            if logits.dim() != 3 or logits.shape[:2] != x.shape:
                raise ValueError(f"the model returned logits of shape {tuple(logits.shape)} for input {tuple(x.shape)}")
            if shift_logits:  # Dream: output i-1 predicts token i
                logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)

            x0 = _choose(logits, temperature, generator)
            confidence = _confidence(logits, x0, remasking, generator)
            eligible = masked & (position < block_end)
            confidence = torch.where(eligible, confidence, -torch.inf)

            # commit each row's k most confident eligible predictions (stable: ties go left)
            order = torch.sort(confidence, dim=-1, descending=True, stable=True).indices
            rank = torch.empty_like(order).scatter_(-1, order, position.expand_as(order))
            commit = eligible & (rank < transfer_counts[:, step : step + 1])
            x = torch.where(commit, x0, x)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return x


__all__ = ["generate", "num_transfer_tokens", "REMASKING"]
