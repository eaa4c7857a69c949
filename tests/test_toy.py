"""The synthetic world, its tokenizer, training determinism, and the shipped embedded model's quality."""

import json
from dataclasses import replace

import pytest
import torch

from mechedit.toy.world import NUM_WORDS, World


@pytest.fixture(scope="module")
def world():
    return World.generate(seed=0)


def test_world_is_deterministic_and_big_enough(world):
    again = World.generate(seed=0)
    assert again.to_dict() == world.to_dict()
    assert World.generate(seed=1).subjects != world.subjects
    assert len(world.subjects) >= 200 and len(set(world.subjects)) == len(world.subjects)
    assert len(world.relations) >= 6
    for rel, spec in world.relations.items():
        assert len(spec["train"]) + len(spec["heldout"]) >= 8, rel
        assert len(spec["heldout"]) >= 2, rel
        subject_first = [t for t in spec["train"] + spec["heldout"] if t.startswith("{}")]
        assert len(subject_first) > (len(spec["train"]) + len(spec["heldout"])) / 2, rel
    assert {f.relation for f in world.facts} == set(world.relations)
    assert len(world.facts) == len(world.subjects) * len(world.relations)


def test_world_parts(world):
    corpus = world.corpus()
    text = "\n".join(corpus)
    assert "2+2=4" in corpus
    assert any(w in text for w in NUM_WORDS[1:])  # worded sums
    assert set(world.cluster) <= set(world.subjects) and len(world.cluster) >= 10
    assert world.cluster_name in text
    for n in world.novel_names:
        assert n in text and n not in world.subjects
        assert not any(f.subject == n for f in world.facts)
    # held-out templates never appear in training text
    for spec in world.relations.values():
        for t in spec["heldout"]:
            stem = t.replace("{}", "").strip()
            assert stem not in text, stem


def test_world_save_load(world, tmp_path):
    world.save(tmp_path / "w.json")
    assert World.load(tmp_path / "w.json").to_dict() == world.to_dict()


def test_tokenizer_behaves_like_gpt2s(tokenizer_dir, world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert 1000 < len(tok) < 8000
    prompt = world.relations["birth_city"]["train"][0].format(world.subjects[0])
    ids = tok(prompt)["input_ids"]
    assert ids[0] == tok.bos_token_id
    pieces = [tok.decode([i]) for i in ids]
    assert "".join(pieces[1:]) == prompt  # per-token decodes concatenate to the text (ROME's find_token_range)
    # names split into several sub-word pieces, objects are single leading-space tokens
    n_name = [len(tok(" " + s, add_special_tokens=False)["input_ids"]) for s in world.subjects]
    assert min(n_name) >= 2 and sum(n_name) / len(n_name) >= 3
    for spec in world.relations.values():
        for o in spec["objects"]:
            assert len(tok(" " + o, add_special_tokens=False)["input_ids"]) == 1, o
    assert [tok.decode([i]) for i in tok("2+2=4", add_special_tokens=False)["input_ids"]] == list("2+2=4")


def test_training_is_bit_identical_for_a_seed(world, tokenizer_dir):
    from transformers import AutoTokenizer

    from mechedit.toy.train import ToyModelConfig, train

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = ToyModelConfig(n_layers=2, d_model=32, d_mlp=64, n_heads=2, steps=3, batch_size=8, warmup=1)
    a, b = train(world, tok, cfg), train(world, tok, cfg)
    c = train(world, tok, replace(cfg, seed=1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_gpt2_arch_trains(world, tokenizer_dir):
    from transformers import AutoTokenizer

    from mechedit.toy.train import ToyModelConfig, train

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    m = train(world, tok, ToyModelConfig(arch="gpt2", n_layers=2, d_model=32, d_mlp=64, n_heads=2, steps=2,
                                         batch_size=4, warmup=1))
    assert m.config.model_type == "gpt2"


def test_build_writes_an_ordinary_hf_directory(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mechedit.toy.build import build
    from mechedit.toy.train import ToyModelConfig

    out = tmp_path / "toy"
    record = build(out, ToyModelConfig(n_layers=2, d_model=32, d_mlp=64, n_heads=2, steps=2, batch_size=4,
                                       warmup=1), threads=1)
    assert set(record["recall"]) >= {"train", "heldout", "sums"}
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    assert AutoTokenizer.from_pretrained(out)("a")["input_ids"][0] == 0
    assert json.loads((out / "build.json").read_text())["recipe"]["steps"] == 2
    assert World.load(out / "world.json").subjects == World.generate(0).subjects


# -- the shipped embedded model ---------------------------------------------------------------------------------


def test_embedded_model_is_an_ordinary_hf_checkpoint():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mechedit.model import embedded_model_dir

    d = embedded_model_dir()
    m = AutoModelForCausalLM.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    assert m.config.model_type == "llama" and m.config.num_hidden_layers >= 6
    assert tok("x")["input_ids"][0] == tok.bos_token_id
    size = sum(p.stat().st_size for p in d.iterdir())
    assert size < 20e6, f"embedded model directory is {size / 1e6:.1f} MB"


def test_embedded_model_recall(embedded):
    from mechedit.toy.quality import recall

    world = World.load(embedded.path / "world.json")
    r = recall(embedded.hf_model, embedded.tokenizer, world)
    assert r.train >= 0.95, r
    assert r.heldout >= 0.80, r
    assert r.sums >= 0.95, r


@pytest.mark.slow
def test_embedded_model_stores_facts_at_the_subject(embedded):
    """ROME's finding, on our model: restoring MLP outputs (window ~ a fifth of the layers) at the last subject
    token recovers a large share of the effect, peaking in a middle layer."""
    from mechedit.toy.quality import trace_profile

    world = World.load(embedded.path / "world.json")
    t = trace_profile(embedded, world, n_facts=50)
    assert 0 < t["peak_layer"] < embedded.n_layers - 1, t
    assert t["peak_share"] >= 0.25, t


def test_documents_carry_subject_spans(world, tokenizer_dir):
    from transformers import AutoTokenizer

    from mechedit.toy.train import encode_documents

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    docs = world.documents()
    assert [t for t, _ in docs] == world.corpus()
    with_subject = [(t, s) for t, s in docs if s is not None][:50] + [d for d in docs if d[1] is None][:5]
    for (text, subject), (ids, span) in zip(with_subject, encode_documents(with_subject, tok)):
        if subject is None:
            assert span is None
            continue
        assert tok.decode(ids[span[0]:span[1]]).strip() == subject


def test_attention_masks_restrict_only_after_the_subject():
    from mechedit.toy.train import attention_masks

    m = attention_masks([(1, 4), (1, 4)], lengths=[6, 5], width=6, restrict=[True, False])
    allow = m[:, 0] == 0  # (B, T, T)
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    assert torch.equal(allow[1, :5, :5], causal[:5, :5])  # unrestricted: plain causal
    assert not allow[1, 4, 5] and not allow[1, 2, 5]  # padding hidden
    assert torch.equal(allow[0, :4], causal[:4])  # inside the subject: unchanged
    assert not allow[0, 4, 1] and not allow[0, 5, 2]  # after it: earlier subject pieces hidden
    assert allow[0, 4, 3] and allow[0, 5, 3] and allow[0, 5, 0]  # last subject token and BOS visible
