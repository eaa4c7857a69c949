"""Logit lens: what would the model answer if it stopped after layer L?

nostalgebraist, "interpreting GPT: the logit lens" (LessWrong, 2020).

The idea. The residual stream is a running sum that the final norm and the unembedding turn into next-token
logits after the last layer. Applying that same final norm and unembedding to the residual stream *earlier*
reads off a guess at every depth: in trained models the answer to a factual prompt often becomes the top token
a few layers before the end, which says where the fact has been assembled by. It is a reading, not an
intervention: early layers are in a basis the unembedding was not trained on, so early guesses are noisy
(the "tuned lens" trains a translator per layer to fix that; this is the plain lens).

Depths: ``0`` is the embeddings (``blocks.0.hook_resid_pre``: token embeddings, plus position embeddings on
GPT-2), and depth ``d`` for ``d >= 1`` is the residual stream after block ``d - 1``
(``blocks.{d-1}.hook_resid_post``). The decoding uses the bridge's own final norm and unembedding
(``model.bridge.ln_final``, ``model.bridge.unembed``), so it is right for every architecture (LayerNorm with
bias on GPT-2/NeoX, RMSNorm on Llama/Qwen2, tied or untied unembedding); at the last depth it reproduces the
model's own logits exactly (a test checks it).

For each depth and prompt position: the ``top_k`` most probable tokens with their probabilities, and the
probability and rank of the answer's *first* token (rank 1 = the most probable token; ties share a rank). For
the answer as a whole, ``answer_prob[d]`` is the lens probability of every answer token at its own position
under teacher forcing (the model reads the prompt and the answer's tokens but the last), as the tracers score
answers.

>>> import mechedit                                                   # doctest: +SKIP
>>> from mechedit.tracing import logit_lens                           # doctest: +SKIP
>>> m = mechedit.load()                                               # the embedded world model
>>> r = logit_lens(m, "Dalo Frenwick was born in")
>>> r.answer_rank[:, -1]                                              # the answer's rank at the last token, by depth
>>> r.emergence()                                                     # first depth where it is the top token
>>> df, fig = r.to_frame(), r.plot()                                  # tidy rows; the lens grid
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

import torch

from mechedit.errors import DataFormatError, InputError
from mechedit.model import LoadedModel
from mechedit.results import JsonResult, tensor_from
from mechedit.sites import Site
from mechedit.tracing.common import clean_run, prepare_prompt

FORMAT = "mechedit.logit_lens/1"


@dataclass(frozen=True)
class LogitLensConfig:
    """How much of each decoded distribution to keep."""

    top_k: int = 5  # most probable tokens kept per (depth, position), most probable first; 5 fits a hover box

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise InputError(f"top_k must be a positive integer, got {self.top_k!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LogitLensConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise DataFormatError(f"logit lens config: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def lens_sites(n_layers: int) -> list[str]:
    """Hook names read at each depth: the embeddings, then each block's output."""
    return [Site(0, "resid_pre").hook_name] + [Site(layer, "resid_post").hook_name for layer in range(n_layers)]


# -- the result -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LogitLensResult(JsonResult):
    """What :func:`logit_lens` read for one prompt. ``save``/``load`` come from :class:`JsonResult`.

    Tensors are indexed ``[depth, position]`` (``[depth, position, k]`` for the top-k), depth 0 being the
    embeddings and depth ``d`` the output of block ``d - 1``.

    The lens intervenes on nothing, so it has no corrupted run; ``low_score`` and ``high_score`` are the whole
    answer's probability read at the first depth (the embeddings) and the last (the model's own output). The
    JSON carries them, and ``scores`` = ``{"answer_token_prob": [depth][position]}``, beside the fields, so that
    every tracer's ``result.json`` has these keys; :meth:`load` reads the fields only."""

    FORMAT: ClassVar[str] = FORMAT

    prompt: str
    subject: str | None
    tokens: list[str]  # prompt tokens, each decoded on its own (BOS included when the model reads one)
    subject_range: tuple[int, int] | None  # [start, end) positions of the subject's tokens; None without one
    answer: str
    answer_ids: list[int]
    sites: list[str]  # hook name read at each depth (n_layers + 1)
    top_ids: torch.Tensor  # (n_layers + 1, n_tokens, top_k) int64 token ids, most probable first
    top_probs: torch.Tensor  # (n_layers + 1, n_tokens, top_k) their probabilities
    top_tokens: list[list[list[str]]]  # the same ids decoded, [depth][position][k]
    answer_token_prob: torch.Tensor  # (n_layers + 1, n_tokens) probability of the answer's first token
    answer_rank: torch.Tensor  # (n_layers + 1, n_tokens) int64 its rank (1 = most probable)
    answer_prob: torch.Tensor  # (n_layers + 1,) whole answer, teacher-forced at its own positions
    config: LogitLensConfig
    model_name: str
    model_fingerprint: str
    extra: dict = field(default_factory=dict)  # free-form notes carried through save/load

    @property
    def n_depths(self) -> int:
        return self.answer_token_prob.shape[0]

    @property
    def low_score(self) -> float:
        """p(answer) read from the embeddings (depth 0)."""
        return float(self.answer_prob[0])

    @property
    def high_score(self) -> float:
        """p(answer) read after the last block: the model's own probability."""
        return float(self.answer_prob[-1])

    def emergence(self, position: int = -1) -> int | None:
        """The first depth at which the answer's first token is the lens's top token at ``position`` (default:
        the last prompt token, where the answer is predicted), or None if it never is."""
        ranks = self.answer_rank[:, position]  # (D,)
        hits = (ranks == 1).nonzero()
        return int(hits[0]) if len(hits) else None

    def to_frame(self):
        """Tidy pandas frame, one row per (depth, position, k) with columns depth, site, position, token,
        is_subject, k (1 = the top token), top_token, top_token_id, top_prob, answer_token_prob, answer_rank
        (the last two are the answer's first token at that depth and position, repeated over k)."""
        import pandas as pd

        start, end = self.subject_range if self.subject_range is not None else (0, 0)
        rows = []
        n_depths, n_tokens, top_k = self.top_ids.shape
        for d in range(n_depths):
            for pos in range(n_tokens):
                p_ans, rank = float(self.answer_token_prob[d, pos]), int(self.answer_rank[d, pos])
                for k in range(top_k):
                    rows.append((d, self.sites[d], pos, self.tokens[pos], start <= pos < end, k + 1,
                                 self.top_tokens[d][pos][k], int(self.top_ids[d, pos, k]),
                                 float(self.top_probs[d, pos, k]), p_ans, rank))
        return pd.DataFrame(rows, columns=["depth", "site", "position", "token", "is_subject", "k", "top_token",
                                           "top_token_id", "top_prob", "answer_token_prob", "answer_rank"])

    def plot(self):
        """The lens grid: depths × positions, the top token in each cell, coloured by the answer's probability."""
        from mechedit.viz.logit_lens import plot_logit_lens

        return plot_logit_lens(self)

    # -- persistence ------------------------------------------------------------------------------------------
    def to_json_dict(self) -> dict:
        return {
            "prompt": self.prompt, "subject": self.subject, "tokens": list(self.tokens),
            "subject_range": list(self.subject_range) if self.subject_range is not None else None,
            "answer": self.answer, "answer_ids": list(self.answer_ids), "sites": list(self.sites),
            "top_ids": self.top_ids.tolist(), "top_probs": self.top_probs.tolist(), "top_tokens": self.top_tokens,
            "answer_token_prob": self.answer_token_prob.tolist(), "answer_rank": self.answer_rank.tolist(),
            "answer_prob": self.answer_prob.tolist(), "config": self.config.to_dict(),
            "model_name": self.model_name, "model_fingerprint": self.model_fingerprint, "extra": self.extra,
            # derived, for readers of every result.json (see the class docstring); not read back
            "low_score": self.low_score, "high_score": self.high_score,
            "scores": {"answer_token_prob": self.answer_token_prob.tolist()},  # [depth][position]
        }

    @classmethod
    def from_json_dict(cls, d: dict) -> "LogitLensResult":
        return cls(
            prompt=d["prompt"], subject=d["subject"], tokens=list(d["tokens"]),
            subject_range=tuple(d["subject_range"]) if d["subject_range"] is not None else None,
            answer=d["answer"], answer_ids=list(d["answer_ids"]), sites=list(d["sites"]),
            top_ids=torch.tensor(d["top_ids"], dtype=torch.int64), top_probs=tensor_from(d["top_probs"]),
            top_tokens=d["top_tokens"], answer_token_prob=tensor_from(d["answer_token_prob"]),
            answer_rank=torch.tensor(d["answer_rank"], dtype=torch.int64),
            answer_prob=tensor_from(d["answer_prob"]), config=LogitLensConfig.from_dict(d["config"]),
            model_name=d["model_name"], model_fingerprint=d["model_fingerprint"], extra=d.get("extra", {}),
        )


# -- the tracer -------------------------------------------------------------------------------------------------


def logit_lens(model: LoadedModel, prompt: str, target: str | None = None, top_k: int = 5, *,
               subject: str | None = None) -> LogitLensResult:
    """Decode the residual stream at every depth and prompt position through the final norm and unembedding.

    Args:
        prompt: the prompt (not empty; at most the model's context).
        target: the answer to rank; None = the model's own greedy next token (see ``prepare_prompt``).
        top_k: most probable tokens kept per (depth, position); at most the vocabulary size.
        subject: optional; when given it must occur in ``prompt`` and its tokens are marked in the result.
    Returns:
        A :class:`LogitLensResult`; per-cell tensors are (n_layers + 1, n_prompt_tokens[, top_k]).
    """
    config = LogitLensConfig(top_k=top_k)
    if config.top_k > model.d_vocab:
        raise InputError(f"top_k is {config.top_k}, more than the vocabulary's {model.d_vocab} tokens")
    p = prepare_prompt(model, prompt, subject, target)
    sites = lens_sites(model.n_layers)
    _, cache = clean_run(model, p, sites)  # hook -> (T_in, d_model)
    n_tokens = len(p.ids)
    first = p.answer_ids[0]
    ans_pos = torch.tensor(p.answer_positions)  # (A,)
    ans_ids = torch.tensor(p.answer_ids)  # (A,)
    top_ids, top_probs, tok_prob, ranks, whole = [], [], [], [], []
    for site in sites:
        logp = decode(model, cache[site]).cpu()  # (T_in, V) log-probabilities
        t_logp, t_ids = logp[:n_tokens].topk(config.top_k, dim=-1)  # (T, k) each
        a_logp = logp[:n_tokens, first]  # (T,)
        top_ids.append(t_ids)
        top_probs.append(t_logp.exp())
        tok_prob.append(a_logp.exp())
        ranks.append(1 + (logp[:n_tokens] > a_logp[:, None]).sum(dim=-1))  # (T,)
        whole.append(logp[ans_pos, ans_ids].sum().exp())  # ()
    top_ids_t = torch.stack(top_ids)  # (D, T, k)
    top_tokens = [[model.token_strings(row.tolist()) for row in depth] for depth in top_ids_t]
    return LogitLensResult(
        prompt=p.text, subject=p.subject, tokens=list(p.tokens), subject_range=p.subject_range, answer=p.answer,
        answer_ids=list(p.answer_ids), sites=sites, top_ids=top_ids_t, top_probs=torch.stack(top_probs),
        top_tokens=top_tokens, answer_token_prob=torch.stack(tok_prob), answer_rank=torch.stack(ranks),
        answer_prob=torch.stack(whole), config=config, model_name=model.name,
        model_fingerprint=model.fingerprint(),
    )


def decode(model: LoadedModel, resid: torch.Tensor) -> torch.Tensor:
    """Log-probabilities the model would give if ``resid`` were its last residual stream: the bridge's final
    norm, then its unembedding, then ``log_softmax``.

    Args:
        resid: (T, d_model) residual stream.
    Returns:
        (T, d_vocab) float32 log-probabilities.
    """
    with torch.no_grad():
        logits = model.bridge.unembed(model.bridge.ln_final(resid[None]))  # (1, T, V)
    return logits[0].float().log_softmax(dim=-1)
