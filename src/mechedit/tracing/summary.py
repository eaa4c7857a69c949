"""Many causal traces at once: ROME's averaged picture of where facts live.

Meng et al. 2022, Figure 2: causal traces of ~1,000 facts the model knows, averaged by the role of each token
in its prompt rather than by position (prompts differ in length and in where the subject sits).

Token roles, for a prompt with subject tokens [start, end) and last token ``T - 1``:

    first subject token       start
    middle subject tokens     start + 1 .. end - 2 (mean over them; none for subjects of 1 or 2 tokens)
    last subject token        end - 1              (a one-token subject is both first and last)
    first subsequent token    end, when it comes before the last token
    further tokens            end + 1 .. T - 2 (mean over them)
    last token                T - 1

Tokens before the subject (BOS, "The" in "The Eiffel Tower") belong to no role, as in ROME. Each record
contributes at most one value per (kind, role, layer) - the mean over its tokens in that role - and a role's
average is over the records that have it (``counts``). ``effects`` are average indirect effects (score − that
record's corrupted score), the quantity ROME plots; ``scores`` are average restored probabilities.

The batch pieces: :func:`read_trace_facts` reads a CounterFact or ``known_1000`` file (detected from its first
record) into :class:`TraceFact` s, a random subset when asked; :func:`trace_facts` traces them one by one,
skipping - by default, as ROME does - facts the model does not answer correctly; :func:`summarize_traces`
averages the traces.

>>> import mechedit                                                   # doctest: +SKIP
>>> from mechedit.tracing.summary import read_trace_facts, trace_facts, summarize_traces
>>> m = mechedit.load("smollm2-135m")
>>> facts = read_trace_facts("known_1000.json", n=50, seed=0)
>>> done = list(trace_facts(m, facts))
>>> s = summarize_traces([d.result for d in done if d.result], skipped=[d.skip_record() for d in done if d.skipped])
>>> s.peak("mlp")                                                     # ('last subject token', 4, 0.21)
>>> s.to_markdown(), s.plot()
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch

from mechedit.data import read_counterfact, read_known
from mechedit.errors import DataFormatError, InputError
from mechedit.model import LoadedModel
from mechedit.results import JsonResult
from mechedit.tracing.causal import CausalTraceConfig, CausalTraceResult, causal_trace
from mechedit.tracing.common import Prompt, noise_scale, prepare_prompt

FORMAT = "mechedit.trace_summary/1"
# role -> its label in tables and figures (ROME's wording)
ROLES: dict[str, str] = {
    "first_subject": "first subject token",
    "middle_subject": "middle subject tokens",
    "last_subject": "last subject token",
    "first_after": "first subsequent token",
    "further": "further tokens",
    "last": "last token",
}


def role_positions(subject_range: tuple[int, int], n_tokens: int) -> dict[str, list[int]]:
    """The prompt positions of each role (see the module docstring); a role may have none."""
    start, end = subject_range
    last = n_tokens - 1
    return {
        "first_subject": [start],
        "middle_subject": list(range(start + 1, end - 1)),
        "last_subject": [end - 1],
        "first_after": [end] if end < last else [],
        "further": list(range(end + 1, last)),
        "last": [last],
    }


# -- the summary ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TraceSummary(JsonResult):
    """Causal traces averaged by token role. ``save``/``load`` come from :class:`JsonResult`.

    ``scores[kind]`` and ``effects[kind]`` are (n_roles, n_layers), rows in the order of ``roles``; a role no
    record has is NaN (null in JSON)."""

    FORMAT: ClassVar[str] = FORMAT

    roles: list[str]  # keys of ROLES, in row order
    scores: dict[str, torch.Tensor]  # kind -> (n_roles, n_layers) mean p(answer) after restoring
    effects: dict[str, torch.Tensor]  # kind -> (n_roles, n_layers) mean indirect effect (score - low_score)
    counts: list[int]  # records contributing to each role
    n_records: int  # traces averaged
    low_score: float  # mean corrupted p(answer)
    high_score: float  # mean clean p(answer)
    window: int  # the traces' MLP/attention window
    records: list[dict]  # per trace: prompt, subject, answer, low_score, high_score, extra
    skipped: list[dict]  # facts not traced: whatever the caller recorded, a "reason" at least
    model_name: str
    model_fingerprint: str
    extra: dict = field(default_factory=dict)  # free-form notes carried through save/load

    @property
    def n_layers(self) -> int:
        return next(iter(self.effects.values())).shape[1]

    def peak(self, kind: str) -> tuple[str, int, float]:
        """(role label, layer, average indirect effect) where ``kind``'s average effect is highest."""
        if kind not in self.effects:
            raise InputError(f"this summary has no kind {kind!r}; it has {list(self.effects)}")
        e = torch.nan_to_num(self.effects[kind], nan=-math.inf)  # (R, L)
        flat = int(e.argmax())
        row, layer = divmod(flat, e.shape[1])
        return ROLES[self.roles[row]], layer, float(self.effects[kind][row, layer])

    def to_frame(self):
        """Tidy pandas frame, one row per (kind, role, layer): kind, role, label, layer, n_records, score,
        indirect_effect."""
        import pandas as pd

        rows = []
        for kind, e in self.effects.items():
            for i, role in enumerate(self.roles):
                for layer in range(e.shape[1]):
                    rows.append((kind, role, ROLES[role], layer, self.counts[i], float(self.scores[kind][i, layer]),
                                 float(e[i, layer])))
        return pd.DataFrame(rows, columns=["kind", "role", "label", "layer", "n_records", "score",
                                           "indirect_effect"])

    def to_markdown(self) -> str:
        """The averages as markdown: a header with the counts, then one table per kind (roles × layers, the
        average indirect effect, the kind's peak in bold)."""
        lines = [f"# Causal trace summary: {self.n_records} records, {self.model_name}", "",
                 f"- traced: {self.n_records}; skipped: {len(self.skipped)}"]
        reasons: dict[str, int] = {}
        for s in self.skipped:
            key = s.get("why", s.get("reason", "?"))
            reasons[key] = reasons.get(key, 0) + 1
        lines += [f"  - {n} × {why}" for why, n in reasons.items()]
        lines += [f"- mean p(answer): clean {self.high_score:.4f}, corrupted {self.low_score:.4f}",
                  f"- MLP/attention window: {self.window} layers", ""]
        for kind, e in self.effects.items():
            label, peak_layer, peak = self.peak(kind)
            lines += [f"## {kind}: average indirect effect (p after restoring − corrupted p)", "",
                      f"Peak {peak:+.4f} at layer {peak_layer}, {label}.", "",
                      "| token | records | " + " | ".join(f"L{i}" for i in range(e.shape[1])) + " |",
                      "|---|---:|" + "---:|" * e.shape[1]]
            for i, role in enumerate(self.roles):
                cells = []
                for layer in range(e.shape[1]):
                    v = float(e[i, layer])
                    cell = "–" if math.isnan(v) else f"{v:+.3f}"
                    cells.append(f"**{cell}**" if ROLES[role] == label and layer == peak_layer else cell)
                lines.append(f"| {ROLES[role]} | {self.counts[i]} | " + " | ".join(cells) + " |")
            lines.append("")
        return "\n".join(lines)

    def plot(self):
        """ROME's averaged picture: one heatmap per kind, token roles down the side, layers along the bottom."""
        from mechedit.viz.trace_summary import plot_trace_summary

        return plot_trace_summary(self)

    # -- persistence ------------------------------------------------------------------------------------------
    def to_json_dict(self) -> dict:
        return {
            "roles": list(self.roles), "labels": [ROLES[r] for r in self.roles],
            "scores": {k: _nested(v) for k, v in self.scores.items()},  # [role][layer]
            "effects": {k: _nested(v) for k, v in self.effects.items()},  # [role][layer]
            "counts": list(self.counts), "n_records": self.n_records, "low_score": self.low_score,
            "high_score": self.high_score, "window": self.window, "records": self.records, "skipped": self.skipped,
            "model_name": self.model_name, "model_fingerprint": self.model_fingerprint, "extra": self.extra,
        }

    @classmethod
    def from_json_dict(cls, d: dict) -> "TraceSummary":
        return cls(
            roles=list(d["roles"]), scores={k: _tensor(v) for k, v in d["scores"].items()},
            effects={k: _tensor(v) for k, v in d["effects"].items()}, counts=list(d["counts"]),
            n_records=int(d["n_records"]), low_score=float(d["low_score"]), high_score=float(d["high_score"]),
            window=int(d["window"]), records=list(d["records"]), skipped=list(d["skipped"]),
            model_name=d["model_name"], model_fingerprint=d["model_fingerprint"], extra=d.get("extra", {}),
        )


def summarize_traces(results: Sequence[CausalTraceResult], skipped: Sequence[dict] = ()) -> TraceSummary:
    """Average causal traces by token role (see the module docstring).

    Args:
        results: traces of one model with the same kinds and window (at least one).
        skipped: facts that were not traced, as plain dicts with a ``"reason"``; carried into the summary.
    Returns:
        A :class:`TraceSummary`.
    """
    results = list(results)
    if not results:
        n = len(skipped)
        raise InputError("no traces to summarise" + (f": the {n} facts were all skipped" if n > 1 else
                                                     ": the one fact was skipped" if n else ""))
    first = results[0]
    kinds, window, n_layers = list(first.scores), first.config.window, first.n_layers
    for i, r in enumerate(results):
        if not isinstance(r, CausalTraceResult):
            raise InputError(f"result {i} is a {type(r).__name__}, not a CausalTraceResult")
        if list(r.scores) != kinds or r.config.window != window or r.n_layers != n_layers:
            raise InputError(f"result {i} ({r.prompt!r}) has kinds {list(r.scores)}, window {r.config.window} and "
                             f"{r.n_layers} layers; the first has {kinds}, {window} and {n_layers}: only traces of "
                             "one model with the same settings can be averaged")
        if r.model_fingerprint != first.model_fingerprint:
            raise InputError(f"result {i} ({r.prompt!r}) was traced on other weights than the first")
    roles = list(ROLES)
    sums = {k: torch.zeros(len(roles), n_layers, dtype=torch.float64) for k in kinds}
    effect_sums = {k: torch.zeros(len(roles), n_layers, dtype=torch.float64) for k in kinds}
    counts = [0] * len(roles)
    for r in results:
        where = role_positions(r.subject_range, len(r.tokens))
        for i, role in enumerate(roles):
            pos = where[role]
            if not pos:
                continue
            counts[i] += 1
            for k in kinds:
                mean = r.scores[k][:, pos].double().mean(dim=1)  # (L,)
                sums[k][i] += mean
                effect_sums[k][i] += mean - r.low_score
    n = torch.tensor(counts, dtype=torch.float64)[:, None]  # (R, 1); 0 -> NaN below
    n = torch.where(n > 0, n, torch.nan)
    return TraceSummary(
        roles=roles, scores={k: (v / n).float() for k, v in sums.items()},
        effects={k: (v / n).float() for k, v in effect_sums.items()}, counts=counts, n_records=len(results),
        low_score=sum(r.low_score for r in results) / len(results),
        high_score=sum(r.high_score for r in results) / len(results), window=window,
        records=[{"prompt": r.prompt, "subject": r.subject, "answer": r.answer, "low_score": r.low_score,
                  "high_score": r.high_score, "extra": r.extra} for r in results],
        skipped=[dict(s) for s in skipped], model_name=first.model_name, model_fingerprint=first.model_fingerprint,
    )


# -- facts from files -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceFact:
    """One fact to trace, read from a data file."""

    index: int  # position of the record in its file
    id: int | str  # the record's case_id (CounterFact) or known_id (known_1000)
    prompt: str
    subject: str
    target: str | None  # the true answer (CounterFact target_true, known_1000 attribute); None when unknown
    source: str  # "counterfact" or "known_1000"

    def to_dict(self) -> dict:
        return {"index": self.index, "id": self.id, "prompt": self.prompt, "subject": self.subject,
                "target": self.target, "source": self.source}


def read_trace_facts(path: str | Path, n: int | None = None, seed: int = 0) -> list[TraceFact]:
    """Facts to trace from a CounterFact file (either layout; ``prompt`` with ``target_true``) or ROME's
    ``known_1000.json`` (``prompt`` with ``attribute``; its ``template`` filled with the subject is sometimes
    shorter than ``prompt``, and ``prompt`` is what ROME traced). The format is detected from the first record
    (``known_id`` means known_1000).

    Args:
        n: how many; None = all. Fewer than the file holds are a random subset drawn with ``seed``, returned in
            file order.
    """
    path = Path(path)
    _check_n(n)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path} is not a JSON file of records ({e})") from None
    if not isinstance(data, list) or not data:
        raise DataFormatError(f"{path} must hold a non-empty JSON list of CounterFact or known_1000 records")
    if isinstance(data[0], dict) and "known_id" in data[0]:
        facts = [TraceFact(i, k.known_id, k.prompt, k.subject, k.attribute, "known_1000")
                 for i, k in enumerate(read_known(path))]
    else:
        facts = [TraceFact(i, r.case_id, r.prompt, r.subject, r.target_true, "counterfact")
                 for i, r in enumerate(read_counterfact(path))]
    return choose_facts(facts, n, seed)


def choose_facts(facts: Sequence[TraceFact], n: int | None, seed: int = 0) -> list[TraceFact]:
    """``n`` of ``facts`` drawn at random with ``seed``, in their original order; all of them when ``n`` is None
    or at least their number."""
    _check_n(n)
    if n is None or n >= len(facts):
        return list(facts)
    return [facts[i] for i in sorted(random.Random(seed).sample(range(len(facts)), n))]


def _check_n(n) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise InputError(f"the number of records must be a positive integer, got {n!r}")


# -- tracing many facts -----------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TracedFact:
    """One fact of :func:`trace_facts`: its trace, or why it was skipped."""

    fact: TraceFact
    result: CausalTraceResult | None  # None when skipped
    skipped: str | None  # why it was not traced; None when traced

    def skip_record(self) -> dict:
        """The fact and the reason, as plain data for :func:`summarize_traces`' ``skipped``."""
        why = self.skipped.split(":", 1)[0] if self.skipped else None
        return {**self.fact.to_dict(), "why": why, "reason": self.skipped}


def known_answer(model: LoadedModel, p: Prompt) -> tuple[bool, str]:
    """Whether greedy decoding reproduces the answer (every answer token is the argmax under teacher forcing),
    and what the model gives instead (as many tokens as the answer)."""
    x = torch.tensor([p.input_ids], device=model.device)  # (1, T_in)
    with torch.no_grad():
        logits = model.bridge(x)  # (1, T_in, V)
    greedy = logits[0, p.answer_positions].argmax(dim=-1).tolist()  # (A,)
    return tuple(greedy) == p.answer_ids, model.tokenizer.decode(greedy)


def trace_facts(model: LoadedModel, facts: Sequence[TraceFact], config: CausalTraceConfig = CausalTraceConfig(),
                *, known_only: bool = True, noise_subjects: Sequence[str] | None = None) -> Iterator[TracedFact]:
    """Trace each fact in turn (a generator: one :class:`TracedFact` per fact, in order).

    Args:
        config: the trace settings. Without ``config.noise``, one noise std is used for every fact - ROME's
            3 × the std of the token embeddings of ``noise_subjects`` (default: the subjects of ``facts``) -
            so that all traces are corrupted alike, and it is recorded in each result's config.
        known_only: skip facts the model does not answer correctly (greedy decoding does not give the
            target), as ROME traces only facts the model knows; facts without a target are then skipped too.
            False traces every fact (without a target: the model's own answer).
    Facts whose prompt or subject cannot be read (subject not found among the tokens, prompt too long) are
    skipped with the reason, never raised.
    """
    facts = list(facts)
    if not facts:
        return
    if config.noise is None:
        subjects = list(noise_subjects) if noise_subjects is not None else [f.subject for f in facts]
        config = replace(config, noise=noise_scale(model, subjects))
    for fact in facts:
        if known_only and fact.target is None:
            yield TracedFact(fact, None, "no true answer: the record has no target to check the model against")
            continue
        try:
            p = prepare_prompt(model, fact.prompt, fact.subject, fact.target)
            if known_only:
                ok, said = known_answer(model, p)
                if not ok:
                    yield TracedFact(fact, None, f"not known: the model answers {said!r}, not {p.answer!r}")
                    continue
            result = causal_trace(model, fact.prompt, fact.subject, fact.target, config)
        except InputError as e:
            yield TracedFact(fact, None, f"unreadable: {e}")
            continue
        yield TracedFact(fact, replace(result, extra={**result.extra, "fact": fact.to_dict()}), None)


# -- JSON helpers -----------------------------------------------------------------------------------------------


def _nested(t: torch.Tensor) -> list:
    """(R, L) tensor as nested lists, NaN written as null (strict JSON)."""
    return [[None if math.isnan(x) else x for x in row] for row in t.tolist()]


def _tensor(value: list) -> torch.Tensor:
    return torch.tensor([[math.nan if x is None else x for x in row] for row in value], dtype=torch.float32)
