"""The embedded world's facts as CounterFact-style edit requests.

Each fact of a :class:`~mechedit.toy.world.World` becomes one :class:`~mechedit.data.EditRecord`, built the way
CounterFact builds its cases so the same editors and evaluations run on both:

* ``template``: one of the relation's *training* templates ("The mother tongue of {} is"), so the model was
  trained on exactly this prompt and should recall the fact before the edit;
* ``paraphrases``: one *held-out* template filled with the subject, a wording the model never saw (does the edit
  generalise beyond the prompt it was made on?);
* ``target_true``: the world's object; ``target_new``: another object of the same relation (a counterfactual
  that is still a plausible answer, as in CounterFact);
* ``neighborhood``: the same template about another subject, answered with that subject's true object. Like
  CounterFact's neighbourhood prompts, the other subject shares the edited subject's true object whenever one
  does, so an edit that rewrites "everyone who speaks French" instead of one person shows up here;
* ``relation_id``: the world's relation name ("language"); ``case_id``: the fact's index in ``world.facts``.

Every random choice for fact ``i`` comes from its own generator seeded by ``(seed, i)``, so a record does not
depend on which other facts were picked: ``world_records(w, n=10)`` is a subset of ``world_records(w)``.

>>> from mechedit.toy.world import World
>>> recs = world_records(World.generate(seed=0), n=3, seed=0)
>>> len(recs), recs[0].target_new != recs[0].target_true
(3, True)
"""

from __future__ import annotations

import random

from mechedit.data import EditRecord
from mechedit.errors import DataFormatError, InputError
from mechedit.toy.world import Fact, World


def world_records(world: World, n: int | None = None, seed: int = 0) -> list[EditRecord]:
    """One edit request per fact of ``world`` (all of them, or a seeded random ``n``), ordered by ``case_id``."""
    facts = world.facts
    if n is None:
        picked = range(len(facts))
    elif isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(facts):
        raise InputError(f"n must be an integer from 0 to {len(facts)} (the world's number of facts), got {n!r}")
    else:
        picked = sorted(random.Random(seed).sample(range(len(facts)), n))
    by_relation: dict[str, list[Fact]] = {}
    for f in facts:
        by_relation.setdefault(f.relation, []).append(f)
    return [_record(world, i, facts[i], by_relation[facts[i].relation], seed) for i in picked]


def _record(world: World, case_id: int, fact: Fact, same_relation: list[Fact], seed: int) -> EditRecord:
    rng = random.Random(f"{seed}/{case_id}")  # str seeds are hashed deterministically (sha512), across runs too
    spec = world.relations[fact.relation]
    template = rng.choice(spec["train"])
    paraphrase = rng.choice(spec["heldout"]).replace("{}", fact.subject)
    alternatives = [o for o in spec["objects"] if o != fact.object]
    if not alternatives:
        raise InputError(f"relation {fact.relation!r} has only one object; no counterfactual target exists")
    others = [f for f in same_relation if f.subject != fact.subject]
    sharing = [f for f in others if f.object == fact.object]
    neighbour = rng.choice(sharing or others) if others else None
    return EditRecord(
        case_id=case_id, template=template, subject=fact.subject, target_new=rng.choice(alternatives),
        target_true=fact.object, paraphrases=(paraphrase,),
        neighborhood=((template.replace("{}", neighbour.subject), neighbour.object),) if neighbour else (),
        relation_id=fact.relation,
    )


def embedded_world() -> World:
    """The world the embedded model was trained on: its saved ``world.json``, or ``World.generate(seed=0)`` (the
    seed the embedded model is trained on) while no model has been built yet."""
    from mechedit.model import embedded_model_dir  # imports torch: only when asked

    path = embedded_model_dir() / "world.json"
    if not path.is_file():
        return World.generate(seed=0)
    try:
        return World.load(path)
    except (ValueError, KeyError, TypeError) as e:  # bad JSON, missing keys, wrong shapes
        raise DataFormatError(f"{path} is not a readable world file ({type(e).__name__}: {e}); rebuild the "
                              "embedded model or delete the file") from None
