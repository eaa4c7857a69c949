"""Training the embedded model on the world's text: a small Llama, every token in the loss, CPU, deterministic.

Same seed, same thread count -> bit-identical weights (seeded generators, no dropout).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mechedit.toy.world import World


@dataclass(frozen=True)
class ToyModelConfig:
    """Shape and training recipe of the embedded model (defaults are the shipped model's)."""

    arch: str = "llama"  # "llama" (shipped) or "gpt2" (exercises GPT-2 code paths: Conv1D, fused qkv)
    n_layers: int = 8  # >= 6 so a middle-layer MLP lookup can be told apart from first/last layers
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512  # 4 x d_model, as GPT-2
    steps: int = 1500
    batch_size: int = 96
    lr: float = 3e-3  # AdamW peak, linear warm-up then cosine decay to 10 %
    warmup: int = 150
    weight_decay: float = 0.05
    seed: int = 0
    n_ctx: int = 64
    # Fraction of subject documents in which tokens after the subject may attend only to the subject's last
    # token. Without it, a small model answers by gathering the name's pieces at the last token and looking
    # the fact up there (measured: the MLP effect at the last subject token is ~0). With it, putting the
    # subject's attributes on its last token - in middle MLP layers, ROME's picture - is the one solution that
    # works on every document; the other documents keep full attention, so inference is in-distribution.
    restrict_fraction: float = 0.5

    def to_dict(self) -> dict:
        return asdict(self)


def make_model(cfg: ToyModelConfig, vocab_size: int, tok: PreTrainedTokenizerFast):
    torch.manual_seed(cfg.seed)
    if cfg.arch == "llama":
        hf_cfg = LlamaConfig(
            vocab_size=vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
            max_position_embeddings=cfg.n_ctx, tie_word_embeddings=True, rms_norm_eps=1e-5,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            attention_dropout=0.0,
        )
        return LlamaForCausalLM(hf_cfg)
    if cfg.arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        hf_cfg = GPT2Config(
            vocab_size=vocab_size, n_embd=cfg.d_model, n_inner=cfg.d_mlp, n_layer=cfg.n_layers,
            n_head=cfg.n_heads, n_positions=cfg.n_ctx, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
        return GPT2LMHeadModel(hf_cfg)
    raise ValueError(f"unknown toy architecture {cfg.arch!r}; choose 'llama' or 'gpt2'")


def encode_documents(docs: list[tuple[str, str | None]], tok: PreTrainedTokenizerFast
                     ) -> list[tuple[list[int], tuple[int, int] | None]]:
    """Token ids (BOS ... EOS) of each document and the [start, end) token span of its subject (or None)."""
    out = []
    for text, subject in docs:
        enc = tok(text, return_offsets_mapping=True)
        ids = enc["input_ids"] + [tok.eos_token_id]
        span = None
        if subject is not None:
            c0 = text.find(subject)
            c1 = c0 + len(subject)
            toks = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < c1 and b > c0]
            span = (toks[0], toks[-1] + 1)
        out.append((ids, span))
    return out


def attention_masks(spans: list[tuple[int, int] | None], lengths: list[int], width: int,
                    restrict: list[bool]) -> torch.Tensor:
    """Additive 4D masks (B, 1, T, T): causal, padding hidden, and - where ``restrict`` - positions after the
    subject see only its *last* token, not its earlier pieces (see :class:`ToyModelConfig`)."""
    allow = torch.tril(torch.ones(width, width, dtype=torch.bool)).repeat(len(lengths), 1, 1)  # (B, T, T)
    for i, (n, span, r) in enumerate(zip(lengths, spans, restrict)):
        allow[i, :, n:] = False
        allow[i, n:, :] = False
        allow[i, n:, n:] = torch.eye(width - n, dtype=torch.bool)  # padded queries see themselves: no NaN
        if r and span is not None:
            s0, s1 = span
            allow[i, s1:, s0:s1 - 1] = False
    mask = torch.zeros(len(lengths), 1, width, width)
    return mask.masked_fill_(~allow[:, None], torch.finfo(torch.float32).min)


def train(world: World, tok: PreTrainedTokenizerFast, cfg: ToyModelConfig,
          progress: Callable[[int, float], None] | None = None):
    """Train a fresh model; ``progress(step, loss)`` is called after every step."""
    model = make_model(cfg, len(tok), tok)
    model.train()
    rng = random.Random(cfg.seed)
    # A fresh corpus each epoch: biographies and filler are re-sampled, facts are fixed.
    epoch_docs: list[tuple[list[int], tuple[int, int] | None]] = []
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    pad = tok.pad_token_id
    for step in range(cfg.steps):
        if len(epoch_docs) < cfg.batch_size:
            fresh = encode_documents(world.documents(random.Random(rng.random())), tok)
            rng.shuffle(fresh)
            epoch_docs.extend(fresh)
        batch, epoch_docs = epoch_docs[: cfg.batch_size], epoch_docs[cfg.batch_size:]
        lengths = [len(b) for b, _ in batch]
        width = max(lengths)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        for i, (b, _) in enumerate(batch):
            ids[i, : len(b)] = torch.tensor(b)
        mask = ids != pad  # (B, T)
        restrict = [rng.random() < cfg.restrict_fraction for _ in batch]
        attn = attention_masks([s for _, s in batch], lengths, width, restrict)  # (B, 1, T, T)
        logits = model(input_ids=ids, attention_mask=attn).logits  # (B, T, V)
        tgt = ids[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none"
        )
        m = mask[:, 1:].reshape(-1).float()
        loss = (loss * m).sum() / m.sum()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if progress is not None:
            progress(step, float(loss.detach()))
    model.eval()
    return model
