"""analyses/sequential_edits.py: the neighbours it scores are facts that none of the edits changes."""

from __future__ import annotations

from mechedit.toy.export import embedded_world, world_records


def test_neighbours_are_redrawn_outside_the_edited_facts(analysis_script):
    seq = analysis_script("sequential_edits")
    world = embedded_world()
    records = world_records(world, n=1000, seed=0)
    edited = {(r.subject, r.relation_id) for r in records}
    subjects = {f.subject for f in world.facts}
    truth = {(f.subject, f.relation): f.object for f in world.facts}

    def neighbour(r):
        (prompt, answer), = r.neighborhood
        before, _, after = r.template.partition("{}")
        return prompt[len(before):len(prompt) - len(after)], answer

    # world_records' own neighbours are mostly edited facts by 1,000 edits: the reason for the re-draw
    assert sum((neighbour(r)[0], r.relation_id) in edited for r in records) > 500
    redrawn = seq.unedited_neighbours(world, records, seed=0)
    assert [r.case_id for r in redrawn] == [r.case_id for r in records]
    same_object = 0
    for old, new in zip(records, redrawn):
        assert (new.subject, new.template, new.target_new, new.paraphrases) == \
            (old.subject, old.template, old.target_new, old.paraphrases)
        subject, answer = neighbour(new)
        assert subject in subjects and subject != new.subject
        assert (subject, new.relation_id) not in edited  # nobody edits the neighbour's fact
        assert truth[(subject, new.relation_id)] == answer  # its true object, in the record's own template
        same_object += answer == new.target_true
    assert same_object > 900  # the same true object where the relation has one left
    assert seq.unedited_neighbours(world, records, seed=0) == redrawn  # seeded


def test_ns_is_split_by_whether_the_neighbours_person_was_edited(analysis_script):
    seq = analysis_script("sequential_edits")
    world = embedded_world()
    records = seq.unedited_neighbours(world, world_records(world, n=1000, seed=0), seed=0)
    first = records[:40]
    edited = {r.subject for r in first}
    person = [seq._neighbour_subject(r) for r in first]
    assert all(p is not None and p != r.subject for p, r in zip(person, first))
    flags = [p in edited for p in person]
    ns = [i % 2 for i in range(40)]  # any 0/1 scores: the split must route each record to its side
    before = [1] * 40
    split = seq.ns_by_neighbour_subject(first, ns, before)
    for value, name in ((True, "nb_person_edited"), (False, "nb_person_unedited")):
        idx = [i for i, f in enumerate(flags) if f is value]
        if not idx:
            assert name not in split
            continue
        assert split[name]["n"] == len(idx)
        assert split[name]["NS"][0] == round(100.0 * sum(ns[i] for i in idx) / len(idx), 2)
        assert split[name]["NS_before"][0] == 100.0
    # by 1,000 edits nearly every neighbour's person has some other fact edited
    full = seq.ns_by_neighbour_subject(records, [1] * 1000, [1] * 1000)
    assert full["nb_person_edited"]["n"] > 900
    # CounterFact-style neighbours (another template) are not split
    from dataclasses import replace
    cf_like = [replace(r, neighborhood=(("Michel Rocard is a native speaker of", "French"),)) for r in first]
    assert seq.ns_by_neighbour_subject(cf_like, ns, before) == {}
