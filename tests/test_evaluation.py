"""The accuracy measures against closed forms and a direct re-computation."""

import math

import torch
import torch.nn.functional as F

from stq_compiler.evaluation import (
    Trajectory,
    agreement,
    follow_trajectory,
    hidden_state_error,
    masked_token_perplexity,
    unigram_perplexity,
    windows,
)
from stq_compiler.models import build_tiny


class FixedLogits(torch.nn.Module):
    """Logits that depend only on the position's input token: a table lookup."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, ids):
        return self.table[ids]


def test_uniform_model_has_perplexity_equal_to_the_vocabulary():
    vocab = 37
    model = FixedLogits(torch.zeros(vocab, vocab))
    ids = torch.randint(0, vocab - 1, (5, 24))
    for ratio in (0.25, 1.0):
        result = masked_token_perplexity(model, ids, ratio, mask_id=vocab - 1, batch_size=2)
        assert math.isclose(result["ppl"], vocab, rel_tol=1e-12)
        assert result["tokens"] == 5 * max(1, round(ratio * 24))


def test_perplexity_matches_a_direct_computation_on_the_same_masks():
    torch.manual_seed(0)
    model = build_tiny("llada").eval()
    mask_id = model.config.mask_token_id
    ids = torch.randint(0, mask_id, (6, 16))
    ratio, seed = 0.5, 3
    got = masked_token_perplexity(model, ids, ratio, mask_id, seed=seed, batch_size=4)
    # the masks: the k highest of a seeded uniform draw per window
    scores = torch.rand(6, 16, generator=torch.Generator().manual_seed(seed))
    masked = torch.zeros(6, 16, dtype=torch.bool).scatter_(1, scores.topk(8, dim=1).indices, True)
    with torch.no_grad():
        logits = model(torch.where(masked, mask_id, ids)).logits.double()
    nll = F.cross_entropy(logits[masked], ids[masked], reduction="mean")
    assert math.isclose(got["nll"], float(nll), rel_tol=1e-10)
    assert masked.sum(1).eq(8).all()


def test_unigram_perplexity_closed_form():
    train = torch.tensor([0, 0, 0, 1])  # add-one counts: 4, 2, 1 over vocabulary 3 -> p = 4/7, 2/7, 1/7
    test = torch.tensor([0, 1, 2])
    expected = math.exp(-(math.log(4 / 7) + math.log(2 / 7) + math.log(1 / 7)) / 3)
    assert math.isclose(unigram_perplexity(train, test, 3), expected, rel_tol=1e-12)


def test_windows_are_non_overlapping_and_evenly_spaced():
    stream = torch.arange(100)
    all_w = windows(stream, 10)
    assert all_w.shape == (10, 10) and torch.equal(all_w.flatten(), stream)
    picked = windows(stream, 10, 4)
    assert picked[:, 0].tolist() == [0, 30, 60, 90]


def test_trajectory_records_every_step_and_comparisons():
    torch.manual_seed(0)
    model = build_tiny("llada").eval()
    prompts = torch.randint(0, model.config.mask_token_id, (2, 4))
    run = follow_trajectory(model, prompts, model.config.mask_token_id, gen_length=8, steps=4, block_length=4)
    assert len(run.hidden) == 4 and run.hidden[0].shape == (2, 12, model.config.d_model)
    assert agreement(run, run) == 1.0
    assert hidden_state_error(run, run) == [0.0] * 4
    other = Trajectory(run.tokens.clone(), [h * 1.1 for h in run.hidden], run.prompt_length)
    other.tokens[0, -1] = (other.tokens[0, -1] + 1) % 10
    assert agreement(run, other) == 1 - 1 / 16
    errors = hidden_state_error(run, other)
    assert all(math.isclose(e, 0.01, rel_tol=1e-2) for e in errors)  # (1.1 h - h)² / h² (h rounded to float16)
