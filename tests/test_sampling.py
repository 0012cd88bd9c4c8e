"""LLaDA's low-confidence remasking sampler, driven by models whose logits are written by hand."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from stq_compiler.models import build_tiny
from stq_compiler.sampling import generate, num_transfer_tokens

VOCAB, MASK = 16, 15


class ScriptedModel(nn.Module):
    """Position p's logits favour token target[p] with margin score[p] (so the softmax
    confidence ranks positions by score); every input is recorded."""

    def __init__(self, target, score=None, shift_logits=False, returns="object", config=True):
        super().__init__()
        self.target = torch.as_tensor(target)
        self.score = torch.ones(len(self.target)) * 4 if score is None else torch.as_tensor(score, dtype=torch.float)
        self.returns = returns
        self.calls: list[torch.Tensor] = []
        if config:
            self.config = SimpleNamespace(mask_token_id=MASK, shift_logits=shift_logits, vocab_size=VOCAB)

    def forward(self, x):
        self.calls.append(x.clone())
        B, L = x.shape
        logits = torch.zeros(B, L, VOCAB)
        logits[:, torch.arange(L), self.target] = self.score
        if self.returns == "tensor":
            return logits
        if self.returns == "tuple":
            return (logits,)
        return SimpleNamespace(logits=logits)


def newly_committed(model: ScriptedModel, final: torch.Tensor) -> list[list[int]]:
    """Positions (row 0) unmasked between consecutive calls, and after the last one."""
    states = [c[0] for c in model.calls] + [final[0]]
    pairs = zip(states[:-1], states[1:], strict=True)
    return [((a == MASK) & (b != MASK)).nonzero().flatten().tolist() for a, b in pairs]


PROMPT = torch.tensor([[1, 2, 3]])


def test_greedy_fills_the_favoured_tokens():
    target = [0, 0, 0] + [4, 5, 6, 7, 8, 9, 10, 11]
    model = ScriptedModel(target)
    out = generate(model, PROMPT, gen_length=8, steps=4, block_length=4)
    assert out.dtype == torch.long and out.shape == (1, 11)
    assert out[0, :3].tolist() == [1, 2, 3]
    assert out[0, 3:].tolist() == target[3:]
    assert not (out == MASK).any()


def test_one_model_call_per_step_with_a_fixed_shape():
    model = ScriptedModel([0] * 3 + [5] * 12)
    generate(model, PROMPT.repeat(2, 1), gen_length=12, steps=6, block_length=4)
    assert len(model.calls) == 6
    assert {tuple(c.shape) for c in model.calls} == {(2, 15)}


def test_tokens_per_step_follow_the_schedule():
    assert num_transfer_tokens(torch.ones(2, 8, dtype=torch.bool), 3).tolist() == [[3, 3, 2]] * 2
    assert num_transfer_tokens(torch.tensor([[True] * 5 + [False] * 3]), 4).tolist() == [[2, 1, 1, 1]]
    model = ScriptedModel([0] * 3 + [5] * 8)
    out = generate(model, PROMPT, gen_length=8, steps=3, block_length=8)
    assert [len(p) for p in newly_committed(model, out)] == [3, 3, 2]


def test_blocks_are_decoded_left_to_right():
    # confidence grows to the right, so an unrestricted sampler would start with the last block
    model = ScriptedModel([0] * 3 + [5] * 12, score=torch.arange(15.0))
    out = generate(model, PROMPT, gen_length=12, steps=6, block_length=4)
    for i, x in enumerate(model.calls):
        block = i // 2
        gen = x[0, 3:].view(3, 4) == MASK
        assert not gen[:block].any()  # earlier blocks are complete
        assert gen[block + 1 :].all()  # later blocks untouched
    committed = newly_committed(model, out)
    for i, positions in enumerate(committed):
        block_start = 3 + 4 * (i // 2)
        assert all(block_start <= p < block_start + 4 for p in positions)


def test_most_confident_positions_are_committed_first():
    score = torch.zeros(7)
    score[3:] = torch.tensor([1.0, 5.0, 3.0, 4.0])
    model = ScriptedModel([0] * 3 + [6, 7, 8, 9], score=score)
    out = generate(model, PROMPT, gen_length=4, steps=4, block_length=4)
    assert newly_committed(model, out) == [[4], [6], [5], [3]]


def test_random_remasking_is_reproducible_and_still_greedy_in_tokens():
    target = [0] * 3 + list(range(1, 9))
    runs = []
    for _ in range(2):
        model = ScriptedModel(target)
        out = generate(model, PROMPT, gen_length=8, steps=8, block_length=8, remasking="random",
                       generator=torch.Generator().manual_seed(3))
        runs.append((out, newly_committed(model, out)))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert runs[0][0][0, 3:].tolist() == target[3:]


def shifted_target():
    # what each position should become, and a model whose output p-1 predicts token p
    want = torch.tensor([0, 0, 0, 4, 5, 6, 7, 8, 9, 10, 11])
    raw = torch.cat([want[1:], want[-1:]])  # output p favours want[p + 1]
    return want, raw


def test_dream_shift_is_read_from_the_config():
    want, raw = shifted_target()
    out = generate(ScriptedModel(raw, shift_logits=True), PROMPT, gen_length=8, steps=8, block_length=8)
    assert out[0, 3:].tolist() == want[3:].tolist()


def test_shift_changes_the_answer():
    want, raw = shifted_target()
    unshifted = generate(ScriptedModel(raw, shift_logits=True), PROMPT, gen_length=8, steps=8, block_length=8,
                         shift_logits=False)
    assert unshifted[0, 3:].tolist() == raw[3:].tolist() != want[3:].tolist()
    explicit = generate(ScriptedModel(raw, config=False), PROMPT, gen_length=8, steps=8, block_length=8,
                        mask_token_id=MASK, shift_logits=True)
    assert explicit[0, 3:].tolist() == want[3:].tolist()


class NoisyModel(nn.Module):
    """Fixed random logits (never the mask token), for sampling at temperature > 0."""

    def __init__(self):
        super().__init__()
        self.logits = torch.randn(1, 19, VOCAB, generator=torch.Generator().manual_seed(0))
        self.logits[..., MASK] = -1e9
        self.config = SimpleNamespace(mask_token_id=MASK)

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1, -1)


def test_temperature_sampling_is_reproducible_with_a_generator():
    def sample(seed):
        return generate(NoisyModel(), PROMPT, gen_length=16, steps=8, block_length=8, temperature=1.0,
                        generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))
    assert not (sample(1) == MASK).any()
    greedy = generate(NoisyModel(), PROMPT, gen_length=16, steps=8, block_length=8)
    assert torch.equal(greedy[0, 3:], NoisyModel().logits[0, 3:].argmax(-1))


@pytest.mark.parametrize("returns", ["tensor", "tuple"])
def test_models_returning_plain_logits(returns):
    model = ScriptedModel([0] * 3 + [5] * 4, returns=returns)
    assert generate(model, PROMPT, gen_length=4, steps=2, block_length=4)[0, 3:].tolist() == [5] * 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gen_length=10, block_length=4), r"gen_length \(10\) must be a multiple of block_length \(4\)"),
        (dict(gen_length=8, block_length=4, steps=3), r"steps \(3\) must be a multiple of the number of blocks"),
        (dict(remasking="top_k"), "unknown remasking 'top_k'"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(steps=0), "steps must be a positive int"),
        (dict(prompt_ids=torch.tensor([1, 2, 3])), "prompt_ids must be a 2-D torch.long tensor"),
        (dict(prompt_ids=torch.ones(1, 3)), "prompt_ids must be a 2-D torch.long tensor"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = dict(prompt_ids=PROMPT, gen_length=8, steps=8, block_length=8) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(ScriptedModel([0] * 11), **args)


def test_mask_token_must_be_known():
    with pytest.raises(ValueError, match="mask_token_id"):
        generate(ScriptedModel([0] * 11, config=False), PROMPT, gen_length=8, steps=8, block_length=8)


class WrongShapeModel(nn.Module):
    def forward(self, x):
        return torch.zeros(1, 2, VOCAB)


def test_wrong_logits_shape_is_reported():
    model = WrongShapeModel()
    with pytest.raises(ValueError, match="logits of shape"):
        generate(model, PROMPT, gen_length=8, steps=8, block_length=8, mask_token_id=MASK)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_real_models_generate(arch):
    torch.manual_seed(0)
    model = build_tiny(arch)
    prompt = torch.randint(0, 200, (2, 5))
    out = generate(model, prompt, gen_length=8, steps=4, block_length=4)
    assert out.shape == (2, 13) and torch.equal(out[:, :5], prompt)


def test_compiled_model_compiles_once():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_tiny("llada")
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=counting_backend, fullgraph=True)
    prompt = torch.randint(0, 200, (1, 5))
    out = generate(compiled, prompt, gen_length=8, steps=4, block_length=4)
    assert len(graphs) == 1
    assert torch.equal(out, generate(model, prompt, gen_length=8, steps=4, block_length=4))


def test_on_step_sees_every_step_input_and_output():
    torch.manual_seed(0)
    model = build_tiny("llada").eval()
    mask_id = model.config.mask_token_id
    prompt = torch.randint(0, mask_id, (1, 3))
    seen = []
    out = generate(model, prompt, gen_length=8, steps=4, block_length=4, on_step=lambda s, x, o: seen.append((s, x.clone(), o.logits)))
    assert [s for s, _, _ in seen] == [0, 1, 2, 3]
    assert (seen[0][1][:, 3:] == mask_id).all()  # the first step sees only masks after the prompt
    assert all(logits.shape == (1, 11, model.config.vocab_size) for _, _, logits in seen)
    # each step's input is the previous input with exactly two more committed tokens
    masked = [int((x == mask_id).sum()) for _, x, _ in seen] + [int((out == mask_id).sum())]
    assert masked == [8, 6, 4, 2, 0]
