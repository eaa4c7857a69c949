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
