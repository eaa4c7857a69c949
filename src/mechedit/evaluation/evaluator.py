"""Did the edit work, and did anything else move? One evaluation for every editing method.

:func:`evaluate` measures an :class:`~mechedit.editing.EditHandle` against the same model without it:

* **CounterFact scores** per request (:mod:`mechedit.evaluation.counterfact`): efficacy, paraphrase and
  neighbourhood success (ES/PS/NS) and magnitude (EM/PM/NM), edited and unedited.
* **Generation**: on each request's prompt and paraphrases the edited model samples a continuation (top-k 5 from
  a fixed seed, as ROME's ``generate_fast``); *fluency* is ROME's weighted bi/tri-gram entropy of it and
  *consistency* ROME's TF-IDF similarity to reference text about the new object. On the embedded world the
  reference is the world's own training text that mentions the new object (its facts and biographies with that
  object), with IDF fitted on the whole world corpus; elsewhere ``EvalConfig.reference`` (object → texts) is used
  when given, and consistency is left out otherwise.
* **Exact-output locality** on *unrelated* prompts: the fraction whose greedy continuation of
  ``locality_tokens`` tokens (default 4: a whole one- or two-token answer and the word after it, but not so long
  that it becomes free generation; cut after an end-of-text token, since what follows it is a new document) is
  token-for-token the unedited model's. This is the strict measure under
  which naive fine-tuning kept only 0-13% of outputs. Beside it, the mean KL(unedited || edited) of the
  next-token distribution on the same prompts.
* **Accuracy** of the greedy next token on the embedded world's 100 sums and on a sample of its other facts
  (when ``model.path / "world.json"`` exists), edited and unedited.
* **Degeneration** on free generation from unrelated prompts: the fraction that fall into a repetition loop
  (:func:`~mechedit.evaluation.text.has_loop`) or collapse onto the new object (more than a quarter of the words
  are it), and the fraction that mention the new object at all - edited and unedited.

Unrelated prompts are ``EvalConfig.unrelated`` when given; else, on the embedded world, a seeded sample of its
facts (one training template each), its 100 sums and the first words of filler sentences; else the requests'
neighbourhood prompts plus :data:`GENERIC_PROMPTS`. Prompts that mention an edited subject are left out of an
edit's locality and accuracy (they *should* change).

An in-context edit (a handle with a context) is queried through ``handle.prompt(text)`` everywhere on the edited
side, unrelated prompts included: that measures whether the context leaks into unrelated answers.

The unedited side is the same for every edit of the same model, so :class:`Evaluator` computes it once per
request and once for the unrelated prompts and reuses it; ``mechedit eval`` runs many edits through one.

>>> import mechedit                                                       # doctest: +SKIP
>>> from mechedit.editing.methods import edit
>>> m = mechedit.load()                                                   # doctest: +SKIP
>>> with edit(m, request, "rome") as h:                                   # doctest: +SKIP
...     result = mechedit.evaluate(m, h, [request])
>>> result.summary()["efficacy_success"]                                  # doctest: +SKIP
(1.0, 0.207, 1.0)
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from mechedit.data import EditRecord
from mechedit.errors import DataFormatError, InputError
from mechedit.evaluation.counterfact import SCORE_KEYS, rewrite_scores
from mechedit.evaluation.stats import clip, interval, mean_ci, rate_over_units, t_quantile, wilson
from mechedit.evaluation.text import TfIdf, has_loop, ngram_entropy, target_share, words
from mechedit.model import LoadedModel
from mechedit.results import JsonResult
from mechedit.tracing.common import encode_target

Progress = Callable[[str, int, int], None]

# Unrelated prompts for models without a world file: everyday text that no factual edit should touch.
GENERIC_PROMPTS = (
    "The weather today is", "My favourite colour is", "Once upon a time, there was a",
    "The capital of France is", "Two plus two equals", "The first day of the week is",
    "Water boils at a temperature of", "The opposite of hot is", "A dog is a kind of",
    "The sun rises in the", "She opened the door and", "The largest ocean on Earth is the",
    "In the morning I like to drink", "The alphabet begins with the letter", "A year has twelve",
    "The chemical symbol for gold is", "He played the piano for", "The train to the city leaves at",
    "Shakespeare wrote the play", "The moon orbits the",
)


@dataclass(frozen=True)
class EvalConfig:
    """What :func:`evaluate` measures and on how much. Every default is explained."""

    # Greedy tokens compared for exact-output locality: a one- or two-token answer plus the following word.
    # Longer continuations turn into free generation, where "identical" means something else.
    locality_tokens: int = 4
    # World facts asked as unrelated prompts (one training template each; seeded sample): enough that one
    # changed answer moves locality by 0.5%, few enough that 200 edits stay fast on a CPU.
    n_world_facts: int = 100
    # Filler sentences (their first five words) among the unrelated prompts on the embedded world.
    n_filler: int = 20
    # Free generations (from the first unrelated prompts) checked for degeneration per edit.
    n_free: int = 10
    # Sampled tokens per generation (fluency, consistency, degeneration); capped by the model's context.
    # ROME sampled 100 tokens on GPT-2 XL; the embedded model's context is 64 tokens.
    gen_tokens: int = 32
    # ROME's generate_fast samples from the top 5 tokens.
    top_k: int = 5
    # A generation whose words are more than this share the new object has collapsed onto it.
    collapse_share: float = 0.25
    # Seed of every sample and of the generations, so two evaluations of the same edit agree exactly.
    seed: int = 0
    # Unrelated prompts given by the user (replace the built-in choice); () = choose as described above.
    unrelated: tuple[str, ...] = ()
    # Reference texts for consistency: {object: [texts about it]} (overrides the world's own text).
    reference: dict = field(default_factory=dict)
    # Measure generation (fluency, consistency, degeneration)? Off makes an evaluation several times faster.
    generation: bool = True

    def __post_init__(self) -> None:
        for name in ("locality_tokens", "gen_tokens", "top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"EvalConfig.{name} must be a positive integer, got {v!r}")
        for name in ("n_world_facts", "n_filler", "n_free"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"EvalConfig.{name} must be a non-negative integer, got {v!r}")
        if not 0 < self.collapse_share <= 1:
            raise InputError(f"EvalConfig.collapse_share must be in (0, 1], got {self.collapse_share!r}")
        if isinstance(self.unrelated, str) or not all(isinstance(p, str) and p.strip() for p in self.unrelated):
            raise InputError("EvalConfig.unrelated must be a list of non-empty prompts")
        object.__setattr__(self, "unrelated", tuple(self.unrelated))
        if not isinstance(self.reference, dict):
            raise InputError("EvalConfig.reference must be a dict {object: [texts]}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["unrelated"] = list(self.unrelated)
        return d


# ---------------------------------------------------------------------------------------------------------------
# The unrelated prompt set
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One unrelated prompt: its kind ("fact", "sum", "filler", "neighbour", "generic", "user"), the subject it
    is about (or None) and the answer whose first token counts as correct (or None: locality only)."""

    kind: str
    prompt: str
    subject: str | None = None
    answer: str | None = None


def _world(model: LoadedModel):
    from mechedit.toy.world import World

    path = model.path / "world.json" if model.path is not None else None
    if path is None or not path.is_file():
        return None
    try:
        return World.load(path)
    except (ValueError, KeyError, TypeError) as e:
        raise DataFormatError(f"{path} is not a readable world file ({type(e).__name__}: {e})") from None


def _probes(model: LoadedModel, world, records: Sequence[EditRecord], cfg: EvalConfig) -> list[Probe]:
    if cfg.unrelated:
        return [Probe("user", p) for p in cfg.unrelated]
    if world is None:
        seen, out = set(), []
        for r in records:
            for p, a in r.neighborhood:
                if p not in seen:
                    seen.add(p)
                    out.append(Probe("neighbour", p, None, a))
        return out + [Probe("generic", p) for p in GENERIC_PROMPTS if p not in seen]
    rng = random.Random(f"eval/{cfg.seed}")
    facts = rng.sample(list(world.facts), min(cfg.n_world_facts, len(world.facts)))
    out = [Probe("fact", world.relations[f.relation]["train"][0].replace("{}", f.subject), f.subject, f.object)
           for f in facts]
    out += [Probe("sum", p, None, a) for p, a in world.sum_prompts()]
    out += [Probe("filler", " ".join(s.split()[:5])) for s in world.filler(rng, cfg.n_filler)]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Model queries
# ---------------------------------------------------------------------------------------------------------------


def _by_length(encoded: Sequence[list[int]]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    return groups


def _eos(model: LoadedModel) -> int | None:
    return model.tokenizer.eos_token_id


@torch.no_grad()
def greedy(model: LoadedModel, prompts: Sequence[str], n_tokens: int) -> tuple[list[tuple[int, ...]], torch.Tensor]:
    """Greedy continuation of each prompt - ``n_tokens`` token ids, or fewer when it ends with the end-of-text
    token (what follows EOS is the start of an unrelated document, not the answer) - and its first next-token
    log-distribution (N, V). Prompts of equal token length run as one batch, so no padding is involved."""
    encoded = [model.encode(p) for p in prompts]
    conts: list[tuple[int, ...]] = [()] * len(prompts)
    first = torch.zeros(len(prompts), model.hf_model.config.vocab_size)
    eos = _eos(model)
    for length, idx in _by_length(encoded).items():
        steps = max(0, min(n_tokens, model.n_ctx - length))
        ids = torch.tensor([encoded[i] for i in idx], device=model.device)  # (B, T)
        out = []
        for step in range(max(steps, 1)):
            logits = model.hf_model(input_ids=ids).logits[:, -1].float()  # (B, V)
            if step == 0:
                first[idx] = torch.log_softmax(logits, -1).cpu()[:, :first.shape[1]]
            if step >= steps:
                break
            nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
            out.append(nxt)
            ids = torch.cat([ids, nxt], dim=1)
        toks = torch.cat(out, dim=1).tolist() if out else [[] for _ in idx]  # (B, steps)
        for j, i in enumerate(idx):
            row = toks[j]
            conts[i] = tuple(row[: row.index(eos) + 1] if eos is not None and eos in row else row)
    return conts, first


@torch.no_grad()
def sample(model: LoadedModel, prompts: Sequence[str], n_tokens: int, top_k: int, seed: int) -> list[list[int]]:
    """Top-k sampled continuation (``n_tokens`` ids, capped by the context) of each prompt, as ROME's
    ``generate_fast``: a fixed length, EOS included. Prompt ``i`` draws from its own generator seeded with
    ``(seed, i)``, so its text does not depend on the other prompts; prompts of equal length share forwards."""
    encoded = [model.encode(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(len(prompts))]
    for length, idx in _by_length(encoded).items():
        steps = max(0, min(n_tokens, model.n_ctx - length))
        ids = torch.tensor([encoded[i] for i in idx], device=model.device)  # (B, T)
        for _ in range(steps):
            logits = model.hf_model(input_ids=ids).logits[:, -1].float().cpu()  # (B, V)
            top, where = logits.topk(min(top_k, logits.shape[-1]), dim=-1)  # (B, k)
            probs = top.softmax(-1)
            pick = torch.stack([where[j, torch.multinomial(probs[j], 1, generator=gens[i])]
                                for j, i in enumerate(idx)])  # (B, 1)
            ids = torch.cat([ids, pick.to(ids.device)], dim=1)
        for j, i in enumerate(idx):
            out[i] = ids[j, length:].tolist()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------

# metric -> (level, description, range). "record" metrics have one value per request; "edit" metrics one per
# edit (they measure the model, not a request: with one-at-a-time editing there is one edit per request). The
# range cuts t intervals to values the metric can take.
RATE, SIGNED, POSITIVE = (0.0, 1.0), (-1.0, 1.0), (0.0, math.inf)
METRICS = {
    "efficacy_success": ("record", "ES: p(new) > p(true) on the edit prompt", RATE),
    "efficacy_magnitude": ("record", "EM: p(new) - p(true) on the edit prompt", SIGNED),
    "paraphrase_success": ("record", "PS: p(new) > p(true) on paraphrases", RATE),
    "paraphrase_magnitude": ("record", "PM: p(new) - p(true) on paraphrases", SIGNED),
    "neighborhood_success": ("record", "NS: p(answer) > p(new) on neighbours", RATE),
    "neighborhood_magnitude": ("record", "NM: p(answer) - p(new) on neighbours", SIGNED),
    "fluency": ("record", "weighted bi/tri-gram entropy of sampled text (bits)", POSITIVE),
    "consistency": ("record", "TF-IDF similarity of sampled text to text about the new object", RATE),
    "locality": ("edit", "unrelated prompts whose greedy continuation is unchanged", RATE),
    "kl": ("edit", "mean KL(unedited || edited), next token on unrelated prompts", POSITIVE),
    "fact_accuracy": ("edit", "world facts (not edited) answered right", RATE),
    "sum_accuracy": ("edit", "world sums answered right", RATE),
    "degenerate": ("edit", "free generations in a loop or collapsed onto the new object", RATE),
    "target_mention": ("edit", "free generations from unrelated prompts mentioning the new object", RATE),
}


@dataclass(frozen=True)
class EvalResult(JsonResult):
    """Everything :func:`evaluate` measured.

    ``records``: one row per request (``case_id``, ``subject``, ``target_new``, ``target_true``, ``edit`` (which
    edit it belongs to), every record metric edited and, prefixed ``pre_``, unedited). ``edits``: one row per
    edit (``edit``, ``n_records``, ``evidence`` (the handle's scalar evidence); each edit metric as ``{metric}`` (the edited value), ``{metric}_n`` (how many
    prompts it is over) and ``pre_{metric}`` (unedited; locality and KL have none); ``kl_sd``). The edited
    sample texts are kept in ``texts`` (per request) for reading.
    """

    FORMAT = "mechedit.eval/1"

    method: str | None
    model_name: str
    config: dict
    records: list[dict]
    edits: list[dict]
    hparams: dict = field(default_factory=dict)
    texts: list[dict] = field(default_factory=list)

    def to_json_dict(self) -> dict:
        return {"method": self.method, "model_name": self.model_name, "config": self.config,
                "records": self.records, "edits": self.edits, "hparams": self.hparams, "texts": self.texts,
                "summary": {k: list(v) for k, v in self.summary().items()}}

    @classmethod
    def from_json_dict(cls, d: dict) -> "EvalResult":
        return cls(method=d["method"], model_name=d["model_name"], config=d["config"], records=d["records"],
                   edits=d["edits"], hparams=d.get("hparams", {}), texts=d.get("texts", []))

    @classmethod
    def merge(cls, results: Sequence["EvalResult"]) -> "EvalResult":
        """One result from several (e.g. one per one-at-a-time edit), edits renumbered in order."""
        if not results:
            raise InputError("nothing to merge")
        records, edits, texts = [], [], []
        for i, r in enumerate(results):
            base = len(edits)
            remap = {e["edit"]: base + j for j, e in enumerate(r.edits)}
            edits += [{**e, "edit": remap[e["edit"]]} for e in r.edits]
            records += [{**row, "edit": remap.get(row["edit"], row["edit"])} for row in r.records]
            texts += r.texts
        first = results[0]
        return cls(first.method, first.model_name, first.config, records, edits, first.hparams, texts)

    # -- views ----------------------------------------------------------------------------------------------
    def summary(self, edited: bool = True) -> dict[str, tuple[float, float, float]]:
        """metric → (mean, lo, hi), the 95% interval of :mod:`mechedit.evaluation.stats`, edited model (or, with
        ``edited=False``, unedited; locality and KL are then 1 and 0 by definition and left out).

        A record metric is summarised over requests. An edit metric is summarised over edits (for rates: the t
        interval of the per-edit rates widened to the Wilson interval of the pooled count, see
        :func:`~mechedit.evaluation.stats.rate_over_units`); with a single edit, over its prompts (Wilson for
        rates, t from the prompts' spread for KL)."""
        pre = "" if edited else "pre_"
        out: dict[str, tuple[float, float, float]] = {}
        for name, (level, _, bounds) in METRICS.items():
            if level == "record":
                vals = [r.get(pre + name) for r in self.records]
                if any(v is not None for v in vals):
                    out[name] = interval(vals, bounds)
                continue
            key = pre + name
            rows = [e for e in self.edits if e.get(key) is not None and e.get(f"{name}_n", 0) > 0]
            if not rows:
                continue
            if len(rows) > 1 and bounds == RATE:
                out[name] = rate_over_units([e[key] for e in rows], [e[f"{name}_n"] for e in rows])
            elif len(rows) > 1:
                out[name] = clip(mean_ci([e[key] for e in rows]), bounds)
            elif name == "kl":
                e = rows[0]
                n, mean, sd = e["kl_n"], e["kl"], e.get("kl_sd", 0.0)
                half = t_quantile(n - 1) * sd / math.sqrt(n) if n > 1 else 0.0
                out[name] = clip((mean, mean - half, mean + half), bounds)
            else:
                e = rows[0]
                n = e[f"{name}_n"]
                out[name] = (e[key], *wilson(round(e[key] * n), n))
        return out

    def to_frame(self):
        """One row per request with its edit's metrics alongside (pandas)."""
        import pandas as pd

        edits = {e["edit"]: e for e in self.edits}
        rows = []
        for r in self.records:
            e = {k: v for k, v in edits.get(r["edit"], {}).items() if k != "edit"}
            evidence = {f"evidence.{k}": v for k, v in (e.pop("evidence", None) or {}).items()}
            rows.append({**r, **e, **evidence})
        return pd.DataFrame(rows)

    def summary_frame(self):
        """The summary as a table: metric, description, edited mean/lo/hi and the unedited mean."""
        import pandas as pd

        pre = self.summary(edited=False)
        rows = [{"metric": k, "description": METRICS[k][1], "mean": m, "lo": lo, "hi": hi,
                 "unedited": pre.get(k, (None,))[0]} for k, (m, lo, hi) in self.summary().items()]
        return pd.DataFrame(rows)

    def plot(self):
        """Bar chart of every summary metric with its 95% interval (edited beside unedited); rates and
        probabilities on the left, fluency (bits) and KL on the right."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        post, pre = self.summary(), self.summary(edited=False)
        right = [k for k in ("fluency", "kl") if k in post]
        left = [k for k in post if k not in right]
        fig = make_subplots(rows=1, cols=2, column_widths=[0.8, 0.2], subplot_titles=("scores", "bits / nats"))
        for col, names in ((1, left), (2, right)):
            for label, summ, color in (("unedited", pre, "#9aa5b1"), ("edited", post, "#1f77b4")):
                ks = [k for k in names if k in summ]
                if not ks:
                    continue
                m = [summ[k][0] for k in ks]
                fig.add_trace(go.Bar(
                    x=ks, y=m, name=label, marker_color=color, showlegend=col == 1,
                    error_y=dict(type="data", symmetric=False, array=[summ[k][2] - summ[k][0] for k in ks],
                                 arrayminus=[summ[k][0] - summ[k][1] for k in ks])), row=1, col=col)
        n = len(self.records)
        fig.update_layout(barmode="group", title=f"{self.method or 'unedited'} on {self.model_name}: {n} "
                          f"request(s), {len(self.edits)} edit(s), 95% intervals")
        return fig


# ---------------------------------------------------------------------------------------------------------------
# The evaluator
# ---------------------------------------------------------------------------------------------------------------


class Evaluator:
    """Evaluates edits of one model, computing the unedited side once.

    Call it only while the model is unedited or edited by the handle being evaluated (the baseline is taken
    with that handle restored). The cache is tied to the unedited model's fingerprint: evaluating a handle made
    for another model state is refused.
    """

    def __init__(self, model: LoadedModel, config: EvalConfig | None = None):
        if config is None:
            config = EvalConfig()
        if not isinstance(config, EvalConfig):
            raise InputError(f"config must be an EvalConfig, got {type(config).__name__}")
        self.model, self.config = model, config
        self.world = _world(model)
        self._fingerprint: str | None = None
        self._records: dict[EditRecord, dict] = {}
        self._probes: list[Probe] | None = None
        self._probe_base: tuple | None = None
        self._tfidf: TfIdf | None = None
        self._reference: dict[str, str] = {}

    # -- baseline ---------------------------------------------------------------------------------------------
    def _check_unedited(self) -> None:
        fp = self.model.fingerprint()
        if self._fingerprint is None:
            self._fingerprint = fp
        elif fp != self._fingerprint:
            raise InputError("the model's weights differ from the unedited model this evaluator measured first; "
                             "restore other edits, or use a new Evaluator")

    def prepare(self, records: Sequence[EditRecord], progress: Progress | None = None) -> None:
        """Compute the unedited side for ``records`` and the unrelated prompts (the model must be unedited)."""
        self._check_unedited()
        if self._probes is None:
            self._probes = _probes(self.model, self.world, records, self.config)
            if not self._probes:
                raise InputError("no unrelated prompts to measure locality on; give EvalConfig.unrelated")
            conts, first = greedy(self.model, [p.prompt for p in self._probes], self.config.locality_tokens)
            correct = self._correct(first, lambda p: p)
            free = self._free(lambda p: p) if self.config.generation else []
            self._probe_base = (conts, first, correct, free)
        todo = [r for r in records if r not in self._records]
        for i, r in enumerate(todo):
            self._records[r] = {"scores": rewrite_scores(self.model, r), "gen": self._generation(r, lambda p: p)}
            if progress is not None:
                progress("unedited", i + 1, len(todo))

    def _correct(self, first: torch.Tensor, prompt_fn) -> list[bool | None]:
        out = []
        for i, p in enumerate(self._probes):
            if p.answer is None or p.kind not in ("fact", "sum"):
                out.append(None)
                continue
            want = encode_target(self.model, prompt_fn(p.prompt), p.answer)[0]
            out.append(bool(int(first[i].argmax()) == want))
        return out

    def _free(self, prompt_fn) -> list[tuple[str, list[int]]]:
        probes = self._probes[: self.config.n_free] if self.world is None else \
            [p for p in self._probes if p.kind in ("fact", "filler")][: self.config.n_free]
        toks = sample(self.model, [prompt_fn(p.prompt) for p in probes], self.config.gen_tokens,
                      self.config.top_k, self.config.seed)
        return [(p.prompt, t) for p, t in zip(probes, toks)]

    def _generation(self, r: EditRecord, prompt_fn) -> dict:
        if not self.config.generation:
            return {}
        prompts = [r.prompt, *r.paraphrases]
        toks = sample(self.model, [prompt_fn(p) for p in prompts], self.config.gen_tokens, self.config.top_k,
                      self.config.seed)
        texts = [self.model.tokenizer.decode(t, skip_special_tokens=True) for t in toks]
        joined = " ".join(texts)
        ref = self._reference_text(r.target_new)
        return {"fluency": sum(ngram_entropy(t) for t in texts) / len(texts),
                "consistency": self._tfidf.similarity(joined, ref) if ref else None,
                "texts": [p + t for p, t in zip(prompts, texts)]}

    def _reference_text(self, obj: str) -> str | None:
        if obj in self._reference:
            return self._reference[obj]
        texts = self.config.reference.get(obj)
        corpus = None
        if texts is None and self.world is not None:
            corpus = self.world.corpus(random.Random(self.world.seed + 1))
            want = set(words(obj))
            texts = [d for d in corpus if want <= set(words(d))][:200]
        if not texts:
            self._reference[obj] = None
            return None
        if self._tfidf is None:
            if corpus is None and self.world is not None:
                corpus = self.world.corpus(random.Random(self.world.seed + 1))
            self._tfidf = TfIdf(corpus if corpus is not None else
                                [t for ts in self.config.reference.values() for t in ts])
        self._reference[obj] = " ".join(texts)
        return self._reference[obj]

    # -- one edit -------------------------------------------------------------------------------------------
    def evaluate(self, edit, records: Sequence[EditRecord] | None = None, progress: Progress | None = None,
                 *, index: int = 0) -> EvalResult:
        """Evaluate ``edit`` (an EditHandle, applied or not, or None for the unedited model) on ``records``
        (default: the handle's own requests). The model is left as it was found."""
        from mechedit.editing.handle import EditHandle

        if edit is not None and not isinstance(edit, EditHandle):
            raise InputError(f"edit must be an EditHandle or None, got {type(edit).__name__}")
        if records is None:
            if edit is None:
                raise InputError("give the requests to evaluate the unedited model on")
            records = edit.records()
        records = [records] if isinstance(records, EditRecord) else list(records)
        if not records or not all(isinstance(r, EditRecord) for r in records):
            raise InputError("requests must be a non-empty list of EditRecords")
        was_applied = edit is not None and edit.applied
        if was_applied and edit.model is not self.model:
            raise InputError("the edit is applied to another model than the one being evaluated")
        if was_applied:
            edit.restore()
        try:
            self.prepare(records, progress)
            if edit is not None:
                edit.apply(self.model)
            try:
                result = self._measure(edit, records, index, progress)
            finally:
                if edit is not None and not was_applied:
                    edit.restore()
        except BaseException:
            if was_applied and edit is not None and not edit.applied:
                edit.apply(self.model)
            raise
        return result

    def _measure(self, edit, records, index, progress) -> EvalResult:
        cfg = self.config
        fn = edit.prompt if edit is not None else (lambda p: p)
        subjects = {r.subject for r in records}
        rows, texts = [], []
        for i, r in enumerate(records):
            base = self._records[r]
            scores = rewrite_scores(self.model, r, fn) if edit is not None else base["scores"]
            gen = self._generation(r, fn) if edit is not None else base["gen"]
            row = {"case_id": r.case_id, "subject": r.subject, "target_new": r.target_new,
                   "target_true": r.target_true, "edit": index}
            for k in SCORE_KEYS:
                row[k], row["pre_" + k] = scores[k], base["scores"][k]
            for k in ("fluency", "consistency"):
                row[k], row["pre_" + k] = gen.get(k), base["gen"].get(k)
            rows.append(row)
            if gen.get("texts"):
                texts.append({"case_id": r.case_id, "edited": gen["texts"], "unedited": base["gen"]["texts"]})
            if progress is not None:
                progress("edited", i + 1, len(records))
        # Unrelated prompts: leave out those about an edited subject (they should change).
        keep = [j for j, p in enumerate(self._probes) if not (p.subject and p.subject in subjects)
                and not any(s in p.prompt for s in subjects)]
        b_conts, b_first, b_correct, b_free = self._probe_base
        if edit is None:
            conts, first, correct, free = b_conts, b_first, b_correct, b_free
        else:
            conts, first = greedy(self.model, [fn(self._probes[j].prompt) for j in range(len(self._probes))],
                                  cfg.locality_tokens)
            correct = self._correct(first, fn)
            free = self._free(fn) if cfg.generation else []
        same = [conts[j] == b_conts[j] for j in keep]
        kl = [float((b_first[j].exp() * (b_first[j] - first[j])).sum().clamp_min(0)) for j in keep]
        e = {"edit": index, "n_records": len(records),
             # the editor's scalar notes (ROME: layer, target_prob reached, norms), to explain a failed edit
             "evidence": {k: v for k, v in (edit.evidence if edit is not None else {}).items()
                          if isinstance(v, (int, float, str, bool))},
             "locality": sum(same) / len(same) if same else None, "locality_n": len(same),
             "kl": sum(kl) / len(kl) if kl else None, "kl_n": len(kl),
             "kl_sd": float(torch.tensor(kl).std()) if len(kl) > 1 else 0.0}
        for name, kind in (("fact_accuracy", "fact"), ("sum_accuracy", "sum")):
            idx = [j for j in keep if self._probes[j].kind == kind and correct[j] is not None]
            e[f"{name}_n"] = len(idx)
            e[name] = sum(correct[j] for j in idx) / len(idx) if idx else None
            e["pre_" + name] = sum(b_correct[j] for j in idx) / len(idx) if idx else None
        if cfg.generation:
            targets = [r.target_new for r in records]
            for prefix, gens in (("", free), ("pre_", b_free)):
                decoded = [(p, t, self.model.tokenizer.decode(t, skip_special_tokens=True)) for p, t in gens]
                kept = [(p, t, s) for p, t, s in decoded if not any(x in p for x in subjects)]
                deg = [has_loop(t) or max(target_share(s, x) for x in targets) > cfg.collapse_share
                       for _, t, s in kept]
                men = [any(set(words(x)) <= set(words(s)) for x in targets) for _, _, s in kept]
                e["degenerate_n"] = e["target_mention_n"] = len(kept)
                e[prefix + "degenerate"] = sum(deg) / len(deg) if deg else None
                e[prefix + "target_mention"] = sum(men) / len(men) if men else None
        hp = edit.hparams if edit is not None else {}
        return EvalResult(method=edit.method if edit is not None else None, model_name=self.model.name,
                          config=cfg.to_dict(), records=rows, edits=[e], hparams=hp, texts=texts)


def evaluate(model: LoadedModel, edit, requests: EditRecord | Sequence[EditRecord] | None = None,
             config: EvalConfig | None = None, progress: Progress | None = None) -> EvalResult:
    """Evaluate one edit (an :class:`~mechedit.editing.EditHandle`, applied or not; None: the unedited model)
    on ``requests`` (default: the handle's own). See the module docstring for what is measured. The model is
    left in the state it was found in (edited by ``edit`` or not). For many edits of the same model use one
    :class:`Evaluator` so the unedited side is computed once."""
    return Evaluator(model, config).evaluate(edit, requests, progress)
