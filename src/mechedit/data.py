"""Edit requests and known facts on disk: CounterFact and ROME's known_1000, read strictly, written atomically.

An *edit request* (:class:`EditRecord`) is what an editor needs and what an evaluation measures: a prompt
template with ``{}`` where the subject goes, the subject, the new object to teach and the true one it replaces,
paraphrases (does the edit generalise?) and neighbourhood prompts about other subjects with their answers (did
anything else move?). This is CounterFact's notion of a case (Meng et al. 2022, "Locating and Editing Factual
Associations in GPT", https://rome.baulab.info).

CounterFact circulates in two layouts and :func:`read_counterfact` reads both, detected from the file's first
record:

* **EasyEdit/MEND** (the layout of ``shared/data/counterfact.json``; one paraphrase, one neighbour)::

    {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
     "target_new": "English", "ground_truth": "French",
     "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
     "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}

  The template is the prompt with the *first* occurrence of the subject replaced by ``{}``.

* **ROME's original** (lists of paraphrases and neighbours; neighbours share the case's true object)::

    {"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
     "target_new": {"str": "English"}, "target_true": {"str": "French"}, "relation_id": "P103"},
     "paraphrase_prompts": [...], "neighborhood_prompts": [...], ...}

Targets are stored as words without a leading space (``"English"``); adding the space a tokenizer needs is the
caller's job. Prompts are filled with ``str.replace``, never ``str.format``, so braces elsewhere are harmless.

Reading is all or nothing: every record is checked before anything is returned, and the first bad one raises
:class:`~mechedit.errors.DataFormatError` naming the file, the record (position and case_id) and the field.

>>> rec = EditRecord(0, "The mother tongue of {} is", "Danielle Darrieux", "English", "French")
>>> rec.prompt
'The mother tongue of Danielle Darrieux is'
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mechedit.errors import DataFormatError, InputError

T = TypeVar("T")


class _BadField(InputError):
    """A record field with a problem. Readers re-raise it as DataFormatError naming the file and record."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"field {field!r} {problem}")


# ---------------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditRecord:
    """One edit request: teach the model that ``template`` filled with ``subject`` continues with ``target_new``.

    ``paraphrases`` are complete prompts (subject filled in) that should follow the edit; ``neighborhood`` holds
    ``(prompt, answer)`` pairs about *other* subjects whose answers should not change. Lists given for either
    are stored as tuples, so a record is hashable and safe to share.
    """

    case_id: int | str
    template: str  # "The mother tongue of {} is": exactly one "{}"
    subject: str  # "Danielle Darrieux"
    target_new: str  # "English" (no leading space)
    target_true: str | None = None  # "French", or None when unknown
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[tuple[str, str], ...] = ()
    relation_id: str | None = None  # Wikidata property such as "P103" (CounterFact), or a world relation name

    def __post_init__(self) -> None:
        _check_id(self.case_id, "case_id")
        _check_template(self.template, "template")
        _check_text(self.subject, "subject")
        _check_text(self.target_new, "target_new")
        if self.target_true is not None:
            _check_text(self.target_true, "target_true")
        _check_optional_str(self.relation_id, "relation_id")
        # Accept lists (e.g. from JSON) but store tuples: the record is frozen all the way down.
        object.__setattr__(self, "paraphrases", tuple(_string_list(self.paraphrases, "paraphrases")))
        object.__setattr__(self, "neighborhood", _pairs(self.neighborhood, "neighborhood"))

    @property
    def prompt(self) -> str:
        """The edit prompt: the template with the subject filled in."""
        return self.template.replace("{}", self.subject)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (lists, not tuples); :meth:`from_dict` inverts it exactly."""
        return {"case_id": self.case_id, "template": self.template, "subject": self.subject,
                "target_new": self.target_new, "target_true": self.target_true,
                "paraphrases": list(self.paraphrases), "neighborhood": [list(p) for p in self.neighborhood],
                "relation_id": self.relation_id}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EditRecord":
        """Build from :meth:`to_dict`'s output. Missing required keys raise :class:`DataFormatError`."""
        if not isinstance(d, dict):
            raise DataFormatError(f"an EditRecord must be built from a dict, got {type(d).__name__}")
        missing = [k for k in ("case_id", "template", "subject", "target_new") if k not in d]
        if missing:
            raise DataFormatError(f"EditRecord dict lacks field(s) {', '.join(map(repr, missing))}")
        try:
            return cls(d["case_id"], d["template"], d["subject"], d["target_new"], d.get("target_true"),
                       d.get("paraphrases", ()), d.get("neighborhood", ()), d.get("relation_id"))
        except _BadField as e:
            raise DataFormatError(f"EditRecord (case_id {d['case_id']!r}): {e}") from None


@dataclass(frozen=True)
class KnownFact:
    """One fact of ROME's ``known_1000`` set: a prompt that GPT-2 XL completes correctly, the input of causal
    tracing (a tracer needs only ``prompt``, ``subject`` and, to score, ``attribute``).

    ``prompt`` is the full prompt that causal tracing runs (in 478 of the 1,209 cases it is longer than
    ``template`` filled with the subject, e.g. template "{} is located in the continent" but prompt "... continent
    of"); ``attribute`` is the correct object; ``prediction`` is GPT-2 XL's greedy continuation.
    """

    known_id: int
    subject: str
    attribute: str
    template: str
    prompt: str
    prediction: str | None = None
    relation_id: str | None = None

    def __post_init__(self) -> None:
        _check_id(self.known_id, "known_id")
        for name in ("subject", "attribute", "prompt"):
            _check_text(getattr(self, name), name)
        _check_template(self.template, "template")
        if self.subject not in self.prompt:
            raise _BadField("subject", f"{self.subject!r} does not occur in the prompt {self.prompt!r}")
        _check_optional_str(self.prediction, "prediction")
        _check_optional_str(self.relation_id, "relation_id")

    def to_dict(self) -> dict[str, Any]:
        return {"known_id": self.known_id, "subject": self.subject, "attribute": self.attribute,
                "template": self.template, "prediction": self.prediction, "prompt": self.prompt,
                "relation_id": self.relation_id}


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def read_counterfact(path: str | Path, *, limit: int | None = None,
                     indices: Sequence[int] | None = None) -> list[EditRecord]:
    """Read a CounterFact file in either layout (see the module docstring) into :class:`EditRecord` s.

    ``limit`` keeps the first ``limit`` records; ``indices`` keeps those positions (0-based, in the order given).
    The whole file is validated either way, so a bad record anywhere is reported, never silently skipped.
    """
    path = Path(path)
    items = _load_json_list(path)
    parse = _parse_rome if items and isinstance(items[0], dict) and "requested_rewrite" in items[0] \
        else _parse_easyedit
    records = _parse_all(items, path, parse, id_key="case_id")
    return _select(records, path, limit, indices)


def read_known(path: str | Path, *, limit: int | None = None,
               indices: Sequence[int] | None = None) -> list[KnownFact]:
    """Read ROME's ``known_1000.json`` (a list of objects with known_id, subject, attribute, template, prediction,
    prompt, relation_id) into :class:`KnownFact` s, with the same all-or-nothing checking."""
    path = Path(path)
    records = _parse_all(_load_json_list(path), path, _parse_known, id_key="known_id")
    return _select(records, path, limit, indices)


def _parse_easyedit(d: dict) -> EditRecord:
    case_id = _get_id(d, "case_id")
    prompt, subject = _get(d, "prompt", str), _get(d, "subject", str)
    _check_text(prompt, "prompt")
    _check_text(subject, "subject")
    if "template" in d:  # written by write_counterfact when the first occurrence would be the wrong one
        template = _get(d, "template", str)
        _check_template(template, "template")
        if template.replace("{}", subject) != prompt:
            raise _BadField("template", f"{template!r} filled with the subject is not the prompt {prompt!r}")
    elif subject not in prompt:
        raise _BadField("subject", f"{subject!r} does not occur in the prompt {prompt!r}")
    else:
        template = prompt.replace(subject, "{}", 1)
    target_new = _get(d, "target_new", str)
    truth = d.get("ground_truth")
    _check_optional_str(truth, "ground_truth")
    truth = truth or None  # "" or null: unknown
    paraphrases = _one_or_many(d.get("rephrase_prompt", []), "rephrase_prompt")
    loc_prompts = _one_or_many(d.get("locality_prompt", []), "locality_prompt")
    loc_answers = _one_or_many(d.get("locality_ground_truth", []), "locality_ground_truth")
    if len(loc_prompts) != len(loc_answers):
        raise _BadField("locality_ground_truth", f"has {len(loc_answers)} answer(s) for {len(loc_prompts)} "
                        "locality prompt(s)")
    return _record(case_id, template, subject, target_new, truth, paraphrases, list(zip(loc_prompts, loc_answers)),
                   d.get("relation_id"), renames={"template": "prompt", "target_true": "ground_truth"})


def _parse_rome(d: dict) -> EditRecord:
    R = "requested_rewrite."
    case_id = _get_id(d, "case_id")
    rw = _get(d, "requested_rewrite", dict)
    template, subject = _get(rw, "prompt", str, R), _get(rw, "subject", str, R)
    target_new = _get(_get(rw, "target_new", dict, R), "str", str, R + "target_new.")
    truth = None
    if rw.get("target_true") is not None:
        truth = _get(_get(rw, "target_true", dict, R), "str", str, R + "target_true.")
    paraphrases = _string_list(d.get("paraphrase_prompts", []), "paraphrase_prompts")
    neighbours = _string_list(d.get("neighborhood_prompts", []), "neighborhood_prompts")
    if neighbours and truth is None:
        raise _BadField(R + "target_true", "is missing; the neighbourhood prompts need it as their answer")
    renames = {k: R + k for k in ("subject", "target_new", "target_true", "relation_id")}
    renames |= {"template": R + "prompt", "paraphrases": "paraphrase_prompts", "neighborhood": "neighborhood_prompts"}
    return _record(case_id, template, subject, target_new, truth, paraphrases, [(p, truth) for p in neighbours],
                   rw.get("relation_id"), renames=renames)


def _parse_known(d: dict) -> KnownFact:
    return KnownFact(known_id=_get(d, "known_id", int), subject=_get(d, "subject", str),
                     attribute=_get(d, "attribute", str), template=_get(d, "template", str),
                     prompt=_get(d, "prompt", str), prediction=d.get("prediction"), relation_id=d.get("relation_id"))


def _record(*args: Any, renames: dict[str, str]) -> EditRecord:
    """Build an EditRecord, reporting a field problem under the file's own field name."""
    try:
        return EditRecord(*args)
    except _BadField as e:
        head, _, rest = e.field.partition("[")
        raise _BadField(renames.get(head, head) + (f"[{rest}" if rest else ""), e.problem) from None


def _load_json_list(path: Path) -> list:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    if not isinstance(data, list):
        raise DataFormatError(f"{path} must hold a JSON list of records, but holds a {_json_type(data)}")
    return data


def _parse_all(items: list, path: Path, parse: Callable[[dict], T], id_key: str) -> list[T]:
    out = []
    for i, d in enumerate(items):
        if not isinstance(d, dict):
            raise DataFormatError(f"{path}: record {i} must be a JSON object, got a {_json_type(d)}")
        where = f"{path}: record {i}" + (f" ({id_key} {d[id_key]!r})" if id_key in d else "")
        try:
            out.append(parse(d))
        except _BadField as e:
            raise DataFormatError(f"{where}: {e}") from None
    return out


def _select(records: list[T], path: Path, limit: int | None, indices: Sequence[int] | None) -> list[T]:
    if limit is not None and indices is not None:
        raise InputError("give limit or indices, not both")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise InputError(f"limit must be a non-negative integer, got {limit!r}")
        return records[:limit]
    if indices is not None:
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(records)]
        if bad:
            raise InputError(f"{path} has {len(records)} records (0..{len(records) - 1}); "
                             f"cannot select index {bad[0]!r}")
        return [records[i] for i in indices]
    return records


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def write_counterfact(records: Iterable[EditRecord], path: str | Path) -> Path:
    """Write records in the EasyEdit layout of ``shared/data/counterfact.json``, atomically; returns the path.

    That layout holds one paraphrase and one neighbour per case, so the *first* of each is written and any further
    ones are dropped. A record with none gets ``""`` for ``rephrase_prompt`` (and for ``locality_prompt`` and
    ``locality_ground_truth``), which reads back as "none". ``ground_truth`` is ``null`` when ``target_true`` is
    None. Two keys beyond the layout are written only when needed to read the record back unchanged:
    ``relation_id`` when set, and ``template`` when the first occurrence of the subject in the prompt is not where
    the template puts it. So a record with at most one paraphrase and one neighbour survives write -> read exactly.
    The file is written to a temporary file beside ``path`` and moved into place, so readers never see half a file.
    """
    records = list(records)
    for i, r in enumerate(records):
        if not isinstance(r, EditRecord):
            raise InputError(f"record {i} is a {type(r).__name__}, not an EditRecord")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(_easyedit_dict(r), ensure_ascii=False) for r in records]
    text = "[\n" + ",\n".join(lines) + "\n]\n" if lines else "[]\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _easyedit_dict(r: EditRecord) -> dict[str, Any]:
    loc_prompt, loc_answer = r.neighborhood[0] if r.neighborhood else ("", "")
    d: dict[str, Any] = {"case_id": r.case_id, "prompt": r.prompt, "target_new": r.target_new,
                         "subject": r.subject, "ground_truth": r.target_true,
                         "rephrase_prompt": r.paraphrases[0] if r.paraphrases else "",
                         "locality_prompt": loc_prompt, "locality_ground_truth": loc_answer}
    if r.relation_id is not None:
        d["relation_id"] = r.relation_id
    if r.prompt.replace(r.subject, "{}", 1) != r.template:
        d["template"] = r.template
    return d


# ---------------------------------------------------------------------------------------------------------------
# Field checks (each raises _BadField naming the field)
# ---------------------------------------------------------------------------------------------------------------


def _get(d: dict, key: str, kind: type, prefix: str = "") -> Any:
    """``d[key]``, which must exist and be of ``kind`` (a JSON boolean never counts as an integer)."""
    if key not in d:
        raise _BadField(prefix + key, "is missing")
    value = d[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _BadField(prefix + key, f"must be a {_json_type(kind())}, got a {_json_type(value)}")
    return value


def _get_id(d: dict, key: str) -> int | str:
    if key not in d:
        raise _BadField(key, "is missing")
    _check_id(d[key], key)
    return d[key]


def _string_list(value: Any, name: str) -> list[str]:
    """A list (or tuple) of non-empty strings."""
    if not isinstance(value, (list, tuple)):
        raise _BadField(name, f"must be a list of strings, got a {_json_type(value)}")
    for k, s in enumerate(value):
        if not isinstance(s, str) or not s.strip():
            raise _BadField(f"{name}[{k}]", f"must be a non-empty string, got {s!r}")
    return list(value)


def _one_or_many(value: Any, name: str) -> list[str]:
    """EasyEdit spells "one" as a string and "none" as ``""``; lists of strings are accepted too."""
    if isinstance(value, str):
        return [value] if value.strip() else []
    return _string_list(value, name)


def _pairs(value: Any, name: str) -> tuple[tuple[str, str], ...]:
    """A list of ``[prompt, answer]`` pairs of non-empty strings, as a tuple of tuples."""
    if not isinstance(value, (list, tuple)):
        raise _BadField(name, f"must be a list of [prompt, answer] pairs, got a {_json_type(value)}")
    for k, pair in enumerate(value):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 \
                or not all(isinstance(x, str) and x.strip() for x in pair):
            raise _BadField(f"{name}[{k}]", f"must be a [prompt, answer] pair of non-empty strings, got {pair!r}")
    return tuple((p, a) for p, a in value)


def _check_optional_str(value: Any, name: str) -> None:
    if value is not None and not isinstance(value, str):
        raise _BadField(name, f"must be a string or null, got a {_json_type(value)}")


def _check_text(value: Any, name: str) -> None:
    if not isinstance(value, str):
        raise _BadField(name, f"must be a string, got a {_json_type(value)}")
    if not value.strip():
        raise _BadField(name, "is empty")


def _check_id(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _BadField(name, f"must be an integer or a string, got a {_json_type(value)}")


def _check_template(value: Any, name: str) -> None:
    _check_text(value, name)
    if value.count("{}") != 1:
        raise _BadField(name, f"must contain exactly one '{{}}' where the subject goes, found "
                        f"{value.count('{}')} in {value!r}")


def _json_type(value: Any) -> str:
    """JSON's name for a Python value's type (for messages about files)."""
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "list"),
                       (tuple, "list"), (dict, "object"), (type(None), "null")):
        if isinstance(value, kind):
            return name
    return type(value).__name__
