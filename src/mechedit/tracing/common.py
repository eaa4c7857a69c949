"""Pieces every tracer shares: a prepared prompt (tokens, subject span, answer tokens), hooks that cannot leak,
the answer's probability under teacher forcing, and ROME's noise scale.

A tracer reads a prompt through :func:`prepare_prompt` so that every tracer agrees on what "the subject's
tokens" and "the answer" are:

    >>> p = prepare_prompt(model, "Dalo Frenwick was born in", "Dalo Frenwick")   # doctest: +SKIP
    >>> p.tokens, p.subject_range                                                  # doctest: +SKIP
    (['<|bos|>', 'D', 'al', 'o', ' Fren', 'w', 'ic', 'k', ' was', ' born', ' in'], (1, 8))

The model's input is the prompt followed by every answer token but the last (teacher forcing), so one forward
gives the probability of a multi-token answer: the product of ``p(answer[i] | prompt, answer[:i])``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mechedit.errors import InputError
from mechedit.model import LoadedModel, resolve_module

# (activation, hook) -> activation or None: the TransformerLens hook signature
HookFn = Callable[..., torch.Tensor | None]


@dataclass(frozen=True)
class Prompt:
    """A prompt as a tracer reads it."""

    text: str
    subject: str | None  # None for tracers that need no subject (logit lens, gradient norms)
    ids: tuple[int, ...]  # prompt token ids as the model reads them (BOS included when the tokenizer adds one)
    tokens: tuple[str, ...]  # each prompt token decoded on its own
    subject_range: tuple[int, int] | None  # [start, end) token positions of the subject in ``ids``; None without one
    answer_ids: tuple[int, ...]  # the answer's tokens (at least one)
    answer: str  # the answer decoded

    @property
    def input_ids(self) -> list[int]:
        """What the model is run on: the prompt, then the answer's tokens but the last (teacher forcing)."""
        return [*self.ids, *self.answer_ids[:-1]]

    @property
    def answer_positions(self) -> list[int]:
        """Positions whose next-token distribution scores each answer token (one per answer token)."""
        n = len(self.ids)
        return list(range(n - 1, n - 1 + len(self.answer_ids)))


def prepare_prompt(model: LoadedModel, prompt: str, subject: str | None, target: str | None = None, *,
                   answer_ids: Sequence[int] | None = None) -> Prompt:
    """Tokenize ``prompt``, find ``subject``'s tokens in it, and fix the answer.

    Args:
        prompt: the text the model reads (``model.encode`` adds BOS where the tokenizer does, and rejects an
            empty prompt or one longer than the context).
        subject: a substring of ``prompt``; its *last* occurrence is the one traced (see
            :func:`find_subject_range`). ``None`` for tracers that need no subject: ``subject`` and
            ``subject_range`` of the result are then None.
        target: the answer to score. ``None`` takes the model's own greedy next token. A string is encoded
            without BOS, with a leading space added where the next word would have one (see
            :func:`needs_space`): ``"Paris"`` after ``"born in"`` is scored as ``" Paris"``, ``"4"`` after
            ``"2+2="`` as ``"4"``.
        answer_ids: the answer's token ids when the caller already has them (with ``target=None``: a tracer
            that ran the prompt itself passes its greedy next token and saves a forward).
    """
    ids = model.encode(prompt)
    tokens = model.token_strings(ids)
    subject_range = find_subject_range(tokens, subject) if subject is not None else None
    if answer_ids is not None:
        if target is not None or not answer_ids:
            raise InputError("pass either target or a non-empty answer_ids, not both")
        answer_ids = [int(i) for i in answer_ids]
    elif target is None:
        with torch.no_grad():
            logits = model.bridge(torch.tensor([ids], device=model.device))  # (1, T, V)
        answer_ids = [int(logits[0, -1].argmax())]
    else:
        answer_ids = encode_target(model, prompt, target)
    if len(ids) + len(answer_ids) - 1 > model.n_ctx:
        raise InputError(f"the prompt ({len(ids)} tokens) and the answer ({len(answer_ids)} tokens) together "
                         f"exceed the model's context of {model.n_ctx} tokens")
    return Prompt(text=prompt, subject=subject, ids=tuple(ids), tokens=tuple(tokens), subject_range=subject_range,
                  answer_ids=tuple(answer_ids), answer=model.tokenizer.decode(answer_ids))


def encode_target(model: LoadedModel, prompt: str, target: str) -> list[int]:
    """Token ids of ``target`` as a continuation of ``prompt`` (no BOS; leading space by :func:`needs_space`)."""
    if not isinstance(target, str) or not target.strip():
        raise InputError("the target is empty; pass the answer to score, or None for the model's own top token")
    if needs_space(prompt, target):
        target = " " + target
    ids = model.tokenizer(target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"the target {target!r} encodes to no tokens")
    return list(ids)


# After these characters the next token carries no leading space ("2+2=" -> "4", "(" -> "a").
_NO_SPACE_AFTER = set("=+-*/^([{\"'`$#@<")


def needs_space(prompt: str, target: str) -> bool:
    """Whether ``target`` continues ``prompt`` as a new space-separated word: not when the prompt already ends
    in whitespace or in one of ``= + - * / ^ ( [ { " ' ` $ # @ <``, nor when the target starts with
    whitespace. CounterFact-style targets (``"Paris"`` after ``"... is located in"``) get the space, as ROME
    scores them; sums (``"4"`` after ``"2+2="``) do not."""
    if not prompt or prompt[-1].isspace() or prompt[-1] in _NO_SPACE_AFTER:
        return False
    return not target[:1].isspace()


def find_subject_range(tokens: Sequence[str], subject: str) -> tuple[int, int]:
    """The [start, end) token range covering ``subject``, ROME's ``find_token_range``.

    The per-token strings are concatenated, the subject's character span is found in that string and mapped
    back to the tokens that overlap it. This takes the **last** occurrence of the subject (ROME takes the
    first); in a few-shot prompt the subject asked about comes last.
    """
    if not isinstance(subject, str) or not subject.strip():
        raise InputError("the subject is empty; pass the words of the prompt that name the subject")
    subject = subject.strip()
    text = "".join(tokens)
    char_start = text.rfind(subject)
    if char_start < 0:
        raise InputError(f"subject {subject!r} is not in the prompt; the prompt's tokens are {list(tokens)}")
    char_end = char_start + len(subject)
    start = end = None
    loc = 0
    for i, tok in enumerate(tokens):
        loc += len(tok)  # characters up to the end of token i
        if start is None and loc > char_start:
            start = i
        if loc >= char_end:
            end = i + 1
            break
    return start, end


# -- hooks ------------------------------------------------------------------------------------------------------


@contextmanager
def hooks(model: LoadedModel, fwd_hooks: Sequence[tuple[str, HookFn]]) -> Iterator[None]:
    """Attach forward hooks to the bridge for the duration of the block; they are removed on exit, also when
    the block raises (``TransformerBridge.hooks`` removes them in a ``finally``).

    Names may be TransformerLens aliases (``blocks.3.hook_mlp_out``); they are resolved to the bridge's
    canonical hook point first, so a hook runs once per forward even in compatibility mode (where a hook
    attached under an alias is called once per name).
    """
    hook_dict = model.bridge.hook_dict
    resolved = []
    for name, fn in fwd_hooks:
        if name not in hook_dict:
            raise InputError(f"the model has no hook {name!r}")
        resolved.append((hook_dict[name].name or name, fn))
    with model.bridge.hooks(fwd_hooks=resolved):
        yield


def live_hooks(model: LoadedModel) -> list[str]:
    """Names of hook points that have any hook attached (temporary or permanent). Empty after every mechedit
    call: tests assert it."""
    points = {id(hp): hp for hp in model.bridge.hook_points()}  # the registry may list a point twice
    return [hp.name for hp in points.values() if hp.fwd_hooks or hp.bwd_hooks]


# -- scoring ----------------------------------------------------------------------------------------------------


def answer_logits(model: LoadedModel, x: torch.Tensor, n_answer: int) -> torch.Tensor:
    """The bridge's logits at the last ``n_answer`` positions only, (B, A, V): the positions that predict the
    answer's tokens (``Prompt.answer_positions``). The unembedding runs on those positions alone
    (``logits_to_keep``), which saves a vocabulary-sized matmul per other position.

    Args:
        x: (B, T) token ids (a batch of 1 may be expanded by a hook inside the forward).
    """
    logits = model.bridge(x, logits_to_keep=n_answer)  # (B, A, V)
    return logits[:, -n_answer:]


def answer_prob(logits: torch.Tensor, prompt: Prompt) -> torch.Tensor:
    """Probability of the whole answer per row: the product over answer tokens of their teacher-forced
    probabilities.

    Args:
        logits: (B, T, V) logits of a run on ``prompt.input_ids``, or (B, A, V) those at the answer positions
            only (:func:`answer_logits`). The answer positions are the last A of the input either way.
    Returns:
        (B,) float32 probabilities.
    """
    n_answer = len(prompt.answer_ids)
    if logits.shape[1] not in (len(prompt.input_ids), n_answer):
        raise ValueError(f"logits cover {logits.shape[1]} positions; expected the whole input "
                         f"({len(prompt.input_ids)}) or the answer positions only ({n_answer})")
    ans = torch.tensor(prompt.answer_ids, device=logits.device)  # (A,)
    probs = logits[:, -n_answer:].float().softmax(dim=-1)  # (B, A, V)
    return probs[:, torch.arange(n_answer), ans].prod(dim=-1)  # (B,)


def clean_run(model: LoadedModel, prompt: Prompt, hook_names: Sequence[str]) -> tuple[float, dict[str, torch.Tensor]]:
    """Run the clean prompt once; return the answer's probability and each named activation, (T, ...) each."""
    cache: dict[str, torch.Tensor] = {}

    def save(name: str) -> HookFn:
        def fn(act: torch.Tensor, hook) -> None:
            cache[name] = act[0].detach().clone()  # (T, ...)
        return fn

    x = torch.tensor([prompt.input_ids], device=model.device)  # (1, T)
    with torch.no_grad(), hooks(model, [(n, save(n)) for n in dict.fromkeys(hook_names)]):
        logits = model.bridge(x)  # (1, T, V)
    return float(answer_prob(logits, prompt)[0]), cache


# -- noise ------------------------------------------------------------------------------------------------------


def embedding_module(model: LoadedModel) -> torch.nn.Module:
    """The token embedding (found through the architecture table)."""
    return resolve_module(model.hf_model, model.arch.embed)


def noise_scale(model: LoadedModel, subjects: Sequence[str], multiplier: float = 3.0) -> float:
    """ROME's noise level: ``multiplier`` × the standard deviation of the token embeddings of ``subjects``
    (ROME's ``collect_embedding_std``: every subject encoded on its own, without BOS; one std over all their
    tokens and embedding dimensions)."""
    subjects = [s for s in subjects if isinstance(s, str) and s.strip()]
    if not subjects:
        raise InputError("noise_scale needs at least one non-empty subject")
    if not multiplier > 0:
        raise InputError(f"the noise multiplier must be positive, got {multiplier}")
    emb = embedding_module(model)
    ids = [i for s in subjects for i in model.tokenizer(s, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        vecs = emb(torch.tensor(ids, device=model.device)).float()  # (N, d)
    return multiplier * float(vecs.std())


def draw_noise(samples: int, n_tokens: int, d_model: int, scale: float, seed: int) -> torch.Tensor:
    """(samples, n_tokens, d_model) Gaussian noise of std ``scale`` from a ``torch.Generator`` seeded with
    ``seed``, drawn on the CPU in float32 so that the same seed gives the same noise on every device."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn((samples, n_tokens, d_model), generator=gen, dtype=torch.float32) * scale
