"""Training the bundled model: tokenizer, objective, and a tiny run end to end on the CPU."""

import json
import math

import torch
from safetensors.torch import save_file

from stq_compiler.corpus import CORPORA, SPLITS
from stq_compiler.models import load
from stq_compiler.training import (
    TOKENIZER_FILE,
    TOKENS_FILE,
    TrainSettings,
    masked_diffusion_loss,
    train,
    train_tokenizer,
)

TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "Anarchism is a political philosophy that advocates self-governed societies.",
] * 20


def test_tokenizer_has_the_special_tokens_first_and_round_trips():
    tok = train_tokenizer(TEXTS, vocab_size=300)
    assert [tok.token_to_id(t) for t in ("[PAD]", "[EOS]", "[MASK]")] == [0, 1, 2]
    for text in TEXTS[:3] + ["Ünïcode — and digits 1234, unseen words"]:
        assert tok.decode(tok.encode(text).ids) == text


class Uniform(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return type("Out", (), {"logits": torch.zeros(*ids.shape, self.vocab)})()


def test_objective_is_unbiased_for_a_uniform_model():
    # CE = log V at every masked position and E[masked / t] = 1, so E[loss] = log V. Per sequence
    # the estimate's variance is E[(1 - t) / (L t)] ≈ (ln(1/ε) - 1) / L ≈ 0.74 (ε = 1e-3, L = 8);
    # over 4096 sequences its standard deviation is ≈ 0.013 log V: 5 sigma is 0.07.
    vocab = 50
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (4096, 8), generator=gen)
    loss = masked_diffusion_loss(Uniform(vocab), ids, mask_id=2, generator=gen)
    assert abs(float(loss) / math.log(vocab) - 1) < 0.07


def test_tiny_training_run_writes_a_loadable_model_and_learns(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    tok = train_tokenizer(TEXTS, vocab_size=300)
    tok.save(str(data / TOKENIZER_FILE))
    ids = torch.tensor([i for t in TEXTS for i in tok.encode(t).ids + [1]], dtype=torch.int16)
    save_file({f"{c}.{s}": ids.clone() for c in CORPORA for s in SPLITS}, str(data / TOKENS_FILE))
    settings = TrainSettings(
        d_model=32, n_heads=2, n_layers=1, mlp_hidden_size=64, seq_len=32, batch_size=8,
        steps=90, time_limit_s=600, lr=1e-2, warmup_steps=5, eval_every=30,
    )
    record = train(data, tmp_path / "model", settings, device="cpu", compile=False, progress=False)
    model = load(tmp_path / "model")
    assert model.config.mask_token_id == 2 and model.config.vocab_size == tok.get_vocab_size()
    assert next(model.parameters()).dtype == torch.float16
    history = json.loads((tmp_path / "model" / "training.json").read_text())["history"]
    assert [h["step"] for h in history] == [30, 60, 90] and record["steps_done"] == 90
    # a model that learned nothing scores log V in expectation (the test above); this text is repetitive
    losses = [h["valid_loss"] for h in history]
    assert losses[-1] < losses[0] and losses[-1] < 0.7 * math.log(tok.get_vocab_size())
    assert (tmp_path / "model" / TOKENIZER_FILE).is_file()
