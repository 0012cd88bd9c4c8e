"""Train the bundled model: a small LLaDA on KJV + Wikipedia with the masked-diffusion objective.

Two steps, one command each (``make model`` runs both; the second wants a GPU):

    python -m stq_compiler.training prepare --out .cache/stq-tiny-llada   # CPU: corpus, tokenizer, token ids
    python -m stq_compiler.training train --data .cache/stq-tiny-llada --out stq_compiler/models/stq-tiny-llada

``prepare`` extracts the corpora (``stq_compiler.corpus``), trains a byte-level BPE tokenizer on the
train split with the ``tokenizers`` library (special tokens ``[PAD]``, ``[EOS]``, ``[MASK]``), and
writes the token ids of every split as one safetensors file. ``train`` runs the LLaDA objective
(Nie et al., 2025): draw ``t ~ U(ε, 1)`` per sequence, replace each token by ``[MASK]`` with
probability ``t``, and minimise the cross-entropy on the masked positions weighted by ``1/t``,
averaged over all positions. It keeps the checkpoint with the lowest loss on the calibration split
(never the held-out one) and writes it in float16 with ``config.json``, the tokenizer and
``training.json`` (settings, loss curve, time).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from stq_compiler.corpus import CORPORA, SPLITS, texts
from stq_compiler.models.llada import LLaDAConfig, LLaDAModelLM

SPECIAL_TOKENS = ("[PAD]", "[EOS]", "[MASK]")
TOKENS_FILE = "tokens.safetensors"
TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(corpus_texts: list[str], vocab_size: int = 4096):
    """A byte-level BPE tokenizer (``tokenizers``) with ``[PAD]=0``, ``[EOS]=1``, ``[MASK]=2``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts, trainer=trainer)
    return tok


def as_transformers_tokenizer(tok):
    """Wrap a ``tokenizers.Tokenizer`` so ``tokenizer(text)["input_ids"]`` and ``decode`` work."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", mask_token="[MASK]")


def prepare(out: Path, vocab_size: int = 4096) -> dict:
    """Corpus → tokenizer → token streams (documents joined by ``[EOS]``) per corpus and split."""
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(texts("kjv", "train") + texts("wiki", "train"), vocab_size)
    tok.save(str(out / TOKENIZER_FILE))
    eos = tok.token_to_id("[EOS]")
    streams, sizes = {}, {}
    for corpus in CORPORA:
        for split in SPLITS:
            ids: list[int] = []
            for encoding in tok.encode_batch(texts(corpus, split)):
                ids.extend(encoding.ids)
                ids.append(eos)
            streams[f"{corpus}.{split}"] = torch.tensor(ids, dtype=torch.int16 if vocab_size <= 32767 else torch.int32)
            sizes[f"{corpus}.{split}"] = len(ids)
    from safetensors.torch import save_file

    save_file(streams, str(out / TOKENS_FILE), metadata={"vocab_size": str(tok.get_vocab_size())})
    return sizes


@dataclass
class TrainSettings:
    d_model: int = 256
    n_heads: int = 8
    n_layers: int = 6
    mlp_hidden_size: int = 768
    seq_len: int = 256
    batch_size: int = 128
    steps: int = 20000
    time_limit_s: float = 480.0  # the schedule ends at `steps` or at this time, whichever comes first
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 300
    weight_decay: float = 0.1
    short_fraction: float = 0.2  # share of steps at a shorter random length (the sampler runs short sequences)
    eval_every: int = 500
    eps: float = 1e-3  # t ~ U(eps, 1)
    seed: int = 0


def model_config(settings: TrainSettings, vocab_size: int, mask_id: int, eos_id: int, pad_id: int) -> LLaDAConfig:
    return LLaDAConfig(
        d_model=settings.d_model,
        n_heads=settings.n_heads,
        n_kv_heads=settings.n_heads,
        n_layers=settings.n_layers,
        mlp_hidden_size=settings.mlp_hidden_size,
        vocab_size=vocab_size,
        embedding_size=vocab_size,
        max_sequence_length=2 * settings.seq_len,
        rope_theta=10000.0,
        mask_token_id=mask_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def masked_diffusion_loss(model, ids: torch.Tensor, mask_id: int, generator: torch.Generator, eps: float = 1e-3) -> torch.Tensor:
    """LLaDA's pre-training loss: CE on masked positions weighted by 1/t, over all B·L positions."""
    batch, length = ids.shape
    t = eps + (1 - eps) * torch.rand(batch, 1, device=ids.device, generator=generator)
    masked = torch.rand(batch, length, device=ids.device, generator=generator) < t
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    logits = model(noisy).logits.float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="none").view(batch, length)
    return (ce * masked / t).sum() / (batch * length)


def random_windows(stream: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``length`` tokens from a 1-D token stream."""
    if stream.numel() <= length:
        raise ValueError(f"the token stream has {stream.numel()} tokens, too few for windows of {length}")
    starts = torch.randint(0, stream.numel() - length, (batch,), generator=generator, device=stream.device)
    return stream[starts[:, None] + torch.arange(length, device=stream.device)]


def _lr_at(progress: float, step: int, s: TrainSettings) -> float:
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * cosine)


@torch.no_grad()
def validation_loss(model, stream: torch.Tensor, mask_id: int, s: TrainSettings, batches: int = 8) -> float:
    """The training objective on fixed windows and masks of a held-aside stream (seeded: comparable across evals)."""
    gen = torch.Generator(device=stream.device).manual_seed(1234)
    total = 0.0
    for _ in range(batches):
        total += float(masked_diffusion_loss(model, random_windows(stream, s.batch_size, s.seq_len, gen), mask_id, gen, s.eps))
    return total / batches


def train(data: Path, out: Path, settings: TrainSettings, device: str = "cuda", compile: bool = True, progress: bool = True) -> dict:
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from tqdm.auto import tqdm

    from stq_compiler.models.checkpoint import save

    tok = Tokenizer.from_file(str(data / TOKENIZER_FILE))
    mask_id, eos_id, pad_id = (tok.token_to_id(t) for t in ("[MASK]", "[EOS]", "[PAD]"))
    streams = {k: v.long().to(device) for k, v in load_file(str(data / TOKENS_FILE)).items()}
    train_stream = torch.cat([streams[f"{c}.train"] for c in CORPORA])
    valid_stream = torch.cat([streams[f"{c}.calibration"] for c in CORPORA])

    torch.manual_seed(settings.seed)
    config = model_config(settings, tok.get_vocab_size(), mask_id, eos_id, pad_id)
    model = LLaDAModelLM(config).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr, betas=(0.9, 0.95), fused=device.startswith("cuda"),
    )
    step_model = torch.compile(model, dynamic=False) if compile else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    gen = torch.Generator(device=device).manual_seed(settings.seed)
    short_lengths = [settings.seq_len // 4, settings.seq_len // 2, 3 * settings.seq_len // 4]

    history, best = [], (math.inf, None, -1)
    start = time.perf_counter()
    bar = tqdm(total=settings.steps, desc="train", disable=not progress)
    step = 0
    while True:
        elapsed = time.perf_counter() - start
        progress_frac = max(step / settings.steps, elapsed / settings.time_limit_s)
        if progress_frac >= 1.0:
            break
        lr = _lr_at(progress_frac, step, settings)
        for group in opt.param_groups:
            group["lr"] = lr
        short = torch.rand((), generator=gen, device=device).item() < settings.short_fraction
        length = short_lengths[step % len(short_lengths)] if short else settings.seq_len
        ids = random_windows(train_stream, settings.batch_size, length, gen)
        with amp:
            loss = masked_diffusion_loss(step_model, ids, mask_id, gen, settings.eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        if step % settings.eval_every == 0:
            with amp:
                valid = validation_loss(step_model, valid_stream, mask_id, settings)
            history.append({"step": step, "time_s": round(time.perf_counter() - start, 1), "lr": lr, "train_loss": float(loss), "valid_loss": valid})
            bar.set_postfix(loss=f"{float(loss):.3f}", valid=f"{valid:.3f}")
            if valid < best[0]:
                best = (valid, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}, step)
    bar.close()
    if best[1] is None:  # shorter than one eval interval
        best = (math.nan, {k: v.detach().cpu() for k, v in model.state_dict().items()}, step)
    model.load_state_dict(best[1])
    model = model.to("cpu", torch.float16)
    out.mkdir(parents=True, exist_ok=True)
    save(model, out)
    tok.save(str(out / TOKENIZER_FILE))
    record = {
        "settings": asdict(settings),
        "steps_done": step,
        "best_step": best[2],
        "best_valid_loss": best[0],
        "train_time_s": round(time.perf_counter() - start, 1),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "tokens": {k: int(v.numel()) for k, v in streams.items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "history": history,
    }
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Train the bundled small diffusion LLM (see the module docstring).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="extract the corpora, train the tokenizer, write token ids (CPU)")
    p.add_argument("--out", type=Path, default=Path(".cache/stq-tiny-llada"))
    p.add_argument("--vocab-size", type=int, default=4096)
    t = sub.add_parser("train", help="train the model on prepared data (GPU if there is one)")
    t.add_argument("--data", type=Path, default=Path(".cache/stq-tiny-llada"))
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--no-compile", action="store_true")
    for field, value in asdict(TrainSettings()).items():
        t.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        sizes = prepare(args.out, args.vocab_size)
        print(json.dumps(sizes, indent=1))
        return
    settings = TrainSettings(**{f: getattr(args, f) for f in asdict(TrainSettings())})
    record = train(args.data, args.out, settings, args.device, compile=not args.no_compile)
    print(json.dumps({k: v for k, v in record.items() if k != "history"}, indent=1))


if __name__ == "__main__":
    main()
