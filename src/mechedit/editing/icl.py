"""In-context editing: no weight changes; a context stating the new facts goes before every prompt.

The handle's ``context`` is one sentence per request, made from ``template`` with

* ``{prompt}``: the request's prompt ("The mother tongue of Danielle Darrieux is"),
* ``{answer}``: ``target_new`` as it continues that prompt (leading space by
  :func:`~mechedit.tracing.common.needs_space`: " English" after "is", "5" after "2+2="),
* ``{subject}`` and ``{target_new}`` as given,

repeated ``repeat`` times. With the default template the context of one request is
``"The mother tongue of Danielle Darrieux is English. "``, and the edited model is asked
``handle.prompt(p) == context + p`` for every prompt ``p`` (the evaluation asks unrelated prompts that way too,
so a context that leaks into other subjects' answers shows up in the neighbourhood score).

The deltas are empty: apply/restore do nothing to the weights (but still track whether the edit is applied, as
for every handle), and save/load round-trip the context.

>>> import mechedit
>>> from mechedit.toy.export import embedded_world, world_records
>>> m = mechedit.load()                                                         # doctest: +SKIP
>>> request = world_records(embedded_world(), n=1)[0]
>>> with icl(m, [request]) as h:                                                # doctest: +SKIP
...     print(h.prompt(request.prompt))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from string import Formatter

from mechedit.data import EditRecord
from mechedit.editing.handle import EditHandle
from mechedit.editing.hparams import HyperParams
from mechedit.editing.training import Progress, check_requests
from mechedit.errors import InputError
from mechedit.model import LoadedModel
from mechedit.tracing.common import needs_space

FIELDS = ("prompt", "answer", "subject", "target_new")


@dataclass(frozen=True)
class ICLHyperParams(HyperParams):
    # One sentence per request. The default states the fact in the request's own words, as the embedded model
    # saw facts in training ("<prompt> <answer>."), so a model that copies from context can use it; EasyEdit's
    # IKE instead writes "New Fact: {prompt} {target_new}\n". Fields: {prompt}, {answer}, {subject}, {target_new}.
    template: str = "{prompt}{answer}. "
    # Times the statements are repeated (a small model may need the new fact more than once to override what
    # its weights say).
    repeat: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.template, str) or not self.template.strip():
            raise InputError("template must be a non-empty string such as '{prompt}{answer}. '")
        try:
            names = {f for _, f, _, _ in Formatter().parse(self.template) if f is not None}
        except ValueError as e:
            raise InputError(f"template {self.template!r} is not a valid format string ({e})") from None
        unknown = names - set(FIELDS)
        if unknown:
            raise InputError(f"template {self.template!r} uses unknown field(s) {sorted(unknown)}; known: "
                             f"{', '.join(FIELDS)}")
        if not names & {"answer", "target_new"}:
            raise InputError(f"template {self.template!r} never states the new answer; use {{answer}} or "
                             "{target_new}")
        if isinstance(self.repeat, bool) or not isinstance(self.repeat, int) or self.repeat <= 0:
            raise InputError(f"repeat must be a positive integer, got {self.repeat!r}")


def context_for(requests: Sequence[EditRecord], hparams: ICLHyperParams) -> str:
    """The context stating every request's new fact (see the module docstring)."""
    parts = []
    for r in requests:
        answer = (" " if needs_space(r.prompt, r.target_new) else "") + r.target_new
        parts.append(hparams.template.format(prompt=r.prompt, answer=answer, subject=r.subject,
                                             target_new=r.target_new))
    return "".join(parts) * hparams.repeat


def icl(model: LoadedModel, requests: EditRecord | Sequence[EditRecord], hparams: ICLHyperParams | None = None,
        progress: Progress | None = None) -> EditHandle:
    """An in-context edit of ``model`` (its weights are not touched): the returned, applied handle's ``prompt(p)``
    is what the edited model is asked instead of ``p``."""
    hparams = ICLHyperParams() if hparams is None else hparams
    if not isinstance(hparams, ICLHyperParams):
        raise InputError(f"hparams must be an ICLHyperParams, got {type(hparams).__name__}")
    reqs = check_requests(model, requests)
    context = context_for(reqs, hparams)
    longest = max((p for r in reqs for p in (r.prompt, *r.paraphrases, *(q for q, _ in r.neighborhood))), key=len)
    n_tokens = len(model.tokenizer(context + longest)["input_ids"]) + 1  # + BOS, answer's first token
    if n_tokens >= model.n_ctx:
        raise InputError(f"the context of {len(reqs)} request(s) with a prompt and its answer takes {n_tokens} "
                         f"tokens, more than the model's context of {model.n_ctx}; edit fewer facts at once or use "
                         "a shorter template")
    if progress is not None:
        progress("context", 1, 1)
    handle = EditHandle(method="icl", deltas={}, hparams=hparams.to_dict(), requests=[r.to_dict() for r in reqs],
                        model_name=model.name, model_fingerprint=model.fingerprint(),
                        evidence={"context_tokens": len(model.tokenizer(context)["input_ids"])},
                        context=context)
    handle._apply_checked(model)
    return handle
