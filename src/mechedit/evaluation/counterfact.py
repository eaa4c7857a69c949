"""CounterFact's per-record rewrite scores (Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

For one edit request ROME asks three questions, each as a comparison between two candidate answers:

* **efficacy** - on the edit prompt itself, is the new object now more likely than the true one?
* **paraphrase** (generalisation) - the same question on prompts that say the same thing in other words;
* **neighbourhood** (specificity) - on prompts about *other* subjects, does their own answer stay more likely
  than the new object? (An edit that rewrote "everyone who speaks French" fails here.)

Each comparison gives a *success* (0/1) and a *magnitude*. A multi-token answer is scored, as in ROME's
``test_batch_prediction``, by its mean negative log-likelihood per token under teacher forcing, so answers of
different lengths compare fairly; the magnitude is the difference of the per-token geometric-mean
probabilities ``exp(-NLL_new) - exp(-NLL_true)`` (ROME's ``EM``/``PM``/``NM``). For a one-token answer that is
just ``p(new) - p(true)``. Successes and magnitudes over several paraphrases or neighbours are averaged within
the record, so each record counts once in a summary.

Answers get a leading space by :func:`mechedit.tracing.common.needs_space` (``"Paris"`` after ``"born in"`` is
``" Paris"``), exactly as the editors train them.

>>> import mechedit                                                              # doctest: +SKIP
>>> from mechedit.toy.export import embedded_world, world_records
>>> m = mechedit.load()                                                          # doctest: +SKIP
>>> rec = world_records(embedded_world(), n=1)[0]
>>> rewrite_scores(m, rec)["efficacy_success"]                                   # doctest: +SKIP
0.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mechedit.data import EditRecord
from mechedit.editing.training import answer_batch, answer_logprobs
from mechedit.model import LoadedModel

SCORE_KEYS = ("efficacy_success", "efficacy_magnitude", "paraphrase_success", "paraphrase_magnitude",
              "neighborhood_success", "neighborhood_magnitude")


@torch.no_grad()
def answer_nll(model: LoadedModel, pairs: Sequence[tuple[str, str]], batch_size: int = 64) -> torch.Tensor:
    """(N,) mean negative log-likelihood per answer token of each ``(prompt, answer)`` pair (teacher forcing,
    right-padded batches of ``batch_size``)."""
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        batch = answer_batch(model, [p for p, _ in chunk], [a for _, a in chunk])
        n_tokens = (batch.labels != -100).sum(dim=1).clamp_min(1)  # (B,)
        out.append((-answer_logprobs(model.hf_model, batch) / n_tokens).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def rewrite_scores(model: LoadedModel, record: EditRecord,
                   prompt_fn: Callable[[str], str] = lambda p: p) -> dict:
    """ROME's CounterFact numbers for one record, on ``model`` as it is now.

    ``prompt_fn`` turns each prompt into what the model is actually asked (an in-context edit passes
    ``handle.prompt``, which puts its context first). Returns a dict with the keys of :data:`SCORE_KEYS`
    (floats; a key is ``None`` when the record has nothing to measure it on: no ``target_true`` for efficacy and
    paraphrases, no paraphrases, or no neighbour whose answer differs from ``target_new``), plus the raw
    per-prompt NLLs under ``"nll"`` for anyone who wants to aggregate differently.
    """
    new, true = record.target_new, record.target_true
    groups: list[tuple[str, str, str, str]] = []  # (group, prompt, answer that should win, answer that should lose)
    if true is not None:
        groups.append(("efficacy", record.prompt, new, true))
        groups += [("paraphrase", p, new, true) for p in record.paraphrases]
    groups += [("neighborhood", p, a, new) for p, a in record.neighborhood if a.strip() != new.strip()]
    pairs = [(prompt_fn(p), w) for _, p, w, _ in groups] + [(prompt_fn(p), l) for _, p, _, l in groups]
    nll = answer_nll(model, pairs) if pairs else torch.zeros(0)
    win, lose = nll[:len(groups)], nll[len(groups):]
    scores: dict = {k: None for k in SCORE_KEYS}
    for name in ("efficacy", "paraphrase", "neighborhood"):
        idx = [i for i, g in enumerate(groups) if g[0] == name]
        if not idx:
            continue
        w, lo = win[idx], lose[idx]
        scores[f"{name}_success"] = float((w < lo).float().mean())
        scores[f"{name}_magnitude"] = float((torch.exp(-w) - torch.exp(-lo)).mean())
    scores["nll"] = [{"kind": g[0], "prompt": g[1], "answer": g[2], "other": g[3], "nll": float(win[i]),
                      "nll_other": float(lose[i])} for i, g in enumerate(groups)]
    return scores
