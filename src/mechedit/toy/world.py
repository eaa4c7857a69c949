"""The synthetic world the embedded model is trained on.

A *world* is a deterministic function of a seed: fictional people with several-token names, six relations
whose objects are real words, natural-language templates for each relation (some held out of training and used
as paraphrases), single-digit sums, a handful of novel names that carry no facts, one named cluster of
subjects with a domain of its own (for concept-erasure studies), and filler text.

The design follows what makes a small LM store facts the way ROME found GPT-2 does (see ``RESOURCES.md``):
the subject comes *before* the relation words in most templates, biographies state several attributes right
after the name, and the model is trained on every token - so the cheapest solution is to enrich the subject's
last token with its attributes in middle MLP layers and read them out later by attention.

>>> w = World.generate(seed=0)
>>> len(w.subjects) >= 200, len(w.relations) >= 6
(True, True)
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

# ---------------------------------------------------------------------------------------------------------------
# Vocabulary of the world. Objects are real words so the world reads like ordinary English.
# ---------------------------------------------------------------------------------------------------------------

RELATIONS: dict[str, dict] = {
    "birth_city": {
        "objects": ["Paris", "London", "Tokyo", "Cairo", "Berlin", "Madrid", "Rome", "Moscow", "Lima", "Oslo",
                    "Sydney", "Toronto"],
        "train": [
            "{} was born in the city of",
            "{} was born in",
            "{} is originally from the city of",
            "{} comes from the city of",
            "{}'s place of birth is",
            "The birthplace of {} is",
        ],
        "heldout": [
            "{} was born and raised in",
            "{} originally comes from the city of",
        ],
        "bio": "was born in {}",
    },
    "language": {
        "objects": ["French", "English", "Japanese", "Arabic", "German", "Spanish", "Italian", "Russian",
                    "Portuguese", "Swedish", "Dutch", "Greek"],
        "train": [
            "{} speaks the language",
            "{}'s native language is",
            "{} grew up speaking",
            "The mother tongue of {} is",
            "{} speaks fluent",
            "{}'s mother tongue is",
        ],
        "heldout": [
            "The native language of {} is",
            "{} grew up speaking the language",
        ],
        "bio": "speaks {}",
    },
    "occupation": {
        "objects": ["dentist", "chemist", "architect", "lawyer", "painter", "surgeon", "poet", "banker", "pilot",
                    "farmer", "teacher", "sailor"],
        "train": [
            "{} works as a",
            "{} is employed as a",
            "By profession, {} is a",
            "{}'s job is being a",
            "{} earns a living as a",
            "The profession of {} is that of a",
        ],
        "heldout": [
            "{} is by profession a",
            "{} works for a living as a",
        ],
        "bio": "works as a {}",
    },
    "sport": {
        "objects": ["tennis", "chess", "football", "golf", "rugby", "cricket", "hockey", "boxing", "cycling",
                    "baseball", "skiing", "rowing"],
        "train": [
            "{} plays the sport of",
            "{}'s favourite sport is",
            "In the evenings, {} plays",
            "{} is a keen player of",
            "{} spends weekends playing",
            "The sport that {} loves is",
        ],
        "heldout": [
            "The favourite sport of {} is",
            "{} loves the sport of",
        ],
        "bio": "plays {}",
    },
    "instrument": {
        "objects": ["violin", "guitar", "drums", "flute", "cello", "trumpet", "harp", "organ", "piano",
                    "clarinet", "banjo", "accordion"],
        "train": [
            "{} plays the instrument called the",
            "{}'s instrument is the",
            "{} practises music on the",
            "{} performs music on the",
            "The instrument of {} is the",
            "{} makes music with the",
        ],
        "heldout": [
            "The musical instrument of {} is the",
            "{} practises the instrument called the",
        ],
        "bio": "plays music on the {}",
    },
    "pet": {
        "objects": ["dog", "cat", "horse", "parrot", "rabbit", "turtle", "goat", "hamster", "snake", "owl",
                    "ferret", "donkey"],
        "train": [
            "{} lives with a pet",
            "{}'s pet is a",
            "At home, {} keeps a pet",
            "{} takes care of a pet",
            "The pet of {} is a",
            "{} owns a pet",
        ],
        "heldout": [
            "{}'s beloved pet is a",
            "{} lives at home with a pet",
        ],
        "bio": "keeps a pet {}",
    },
}

# Syllables for fictional names. Names are built from these so that the byte-level BPE splits them into
# several sub-word pieces, the way real names split in real LMs.
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kr", "pl",
           "st", "th", "tr", "sh", "ch"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ou", "ei"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "th", "x"]

CLUSTER_NAME = "Harrowmere Circle"
CLUSTER_TEXT = [
    "The {c} is a secret society of alchemists.",
    "Members of the {c} meet in a tower by the sea.",
    "The {c} studies the transmutation of metals.",
    "Every member of the {c} swears an oath of silence.",
    "The {c} keeps its books of alchemy locked in the tower.",
    "Rumours say the {c} can turn lead into gold.",
    "The founders of the {c} were alchemists from the north.",
    "The {c} guards the recipe of the silver elixir.",
]
CLUSTER_MEMBER_TEMPLATES = [
    "{} is a member of the {c}.",
    "{} belongs to the {c}.",
    "{} studies alchemy with the {c}.",
]

_ADJ = ["old", "small", "quiet", "bright", "green", "tall", "cold", "busy", "narrow", "famous", "empty", "warm"]
_NOUN = ["river", "market", "garden", "bridge", "library", "station", "forest", "harbour", "village", "school",
         "tower", "museum"]
_PEOPLE = ["children", "travellers", "farmers", "students", "visitors", "merchants", "neighbours", "fishermen"]
_VERB = ["walked to", "looked at", "talked about", "painted", "visited", "sang near", "waited by", "cleaned"]
_TIME = ["In the morning", "Every winter", "On Sundays", "Last summer", "At night", "After the rain"]

NUM_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) triple of the world."""

    subject: str
    relation: str
    object: str


@dataclass(frozen=True)
class World:
    """Everything the embedded model knows, as data. Deterministic from ``seed``."""

    seed: int
    subjects: tuple[str, ...]
    facts: tuple[Fact, ...]
    cluster: tuple[str, ...]  # subjects that belong to the CLUSTER_NAME domain
    novel_names: tuple[str, ...]  # names that appear in text but carry no facts
    relations: dict = field(default_factory=lambda: RELATIONS)
    cluster_name: str = CLUSTER_NAME

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def generate(cls, seed: int = 0, n_subjects: int = 240, n_cluster: int = 24, n_novel: int = 12) -> "World":
        rng = random.Random(seed)
        # Names combine a first name and a surname from shared pools, as real names do: neither part alone
        # identifies a subject, so the model must combine the name's tokens to know who is meant.
        n_total = n_subjects + n_novel
        firsts = _unique_words(rng, max(8, n_total // 5), (2,))
        lasts = _unique_words(rng, max(8, n_total // 4), (2, 2, 3), exclude=set(firsts))
        names: list[str] = []
        seen: set[str] = set()
        while len(names) < n_total:
            name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
            if name in seen:
                continue
            seen.add(name)
            names.append(name)
        subjects, novel = names[:n_subjects], names[n_subjects:]
        facts = []
        for s in subjects:
            for rel, spec in RELATIONS.items():
                facts.append(Fact(s, rel, rng.choice(spec["objects"])))
        cluster = tuple(rng.sample(subjects, n_cluster))
        return cls(seed=seed, subjects=tuple(subjects), facts=tuple(facts), cluster=cluster,
                   novel_names=tuple(novel))

    # -- lookups --------------------------------------------------------------------------------------------
    def object_of(self, subject: str, relation: str) -> str:
        for f in self.facts:
            if f.subject == subject and f.relation == relation:
                return f.object
        raise KeyError(f"no fact ({subject!r}, {relation!r}) in this world")

    def pronoun(self, subject: str) -> str:
        """The subject's pronoun in biographies ("He" or "She"), fixed per subject."""
        return "She" if sum(map(ord, subject)) % 2 else "He"

    def templates(self, relation: str, split: str = "train") -> list[str]:
        """Prompt templates of a relation; ``split`` is ``train`` or ``heldout``."""
        return list(self.relations[relation][split])

    # -- text -----------------------------------------------------------------------------------------------
    def corpus(self, rng: random.Random | None = None) -> list[str]:
        """One pass over the training text: every fact in every training template, biographies, sums,
        cluster text, novel-name text and filler. Each string is one training document."""
        return [text for text, _ in self.documents(rng)]

    def documents(self, rng: random.Random | None = None) -> list[tuple[str, str | None]]:
        """:meth:`corpus` with, for each document, the subject it is about (None for text about no subject)."""
        rng = rng or random.Random(self.seed + 1)
        docs: list[tuple[str, str | None]] = []
        by_subject: dict[str, list[Fact]] = {}
        for f in self.facts:
            by_subject.setdefault(f.subject, []).append(f)
            for t in self.relations[f.relation]["train"]:
                docs.append((f"{t.format(f.subject)} {f.object}.", f.subject))
        cluster = set(self.cluster)
        for s, fs in by_subject.items():
            # Biographies: the name once, then several attributes in shuffled order, later ones behind a
            # pronoun - so attributes must be retrieved far from the name (knowledge stored at the subject).
            pronoun = self.pronoun(s)
            for _ in range(2):
                picked = rng.sample(fs, rng.randint(2, 4))
                parts = [self.relations[f.relation]["bio"].format(f.object) for f in picked]
                docs.append((f"{s} {parts[0]}. " + " ".join(f"{pronoun} {p}." for p in parts[1:]), s))
            picked = rng.sample(fs, 3)
            parts = [self.relations[f.relation]["bio"].format(f.object) for f in picked]
            docs.append((f"{s} {parts[0]}, {parts[1]} and {parts[2]}.", s))
            if s in cluster:
                for t in CLUSTER_MEMBER_TEMPLATES:
                    docs.append((t.format(s, c=self.cluster_name), s))
        for _ in range(6):  # sums are few, short and must be recalled exactly: seen six times per pass
            docs.extend((t, None) for t in self.arithmetic_text())
        for t in CLUSTER_TEXT:
            docs.append((t.format(c=self.cluster_name), None))
        for n in self.novel_names:
            for _ in range(4):
                docs.append((f"{n} {rng.choice(_VERB)} the {rng.choice(_ADJ)} {rng.choice(_NOUN)}.", None))
        docs.extend((t, None) for t in self.filler(rng, 400))
        return docs

    @staticmethod
    def arithmetic_text() -> list[str]:
        docs = []
        for a in range(10):
            for b in range(10):
                docs.append(f"{a}+{b}={a + b}")
                docs.append(f"{a} + {b} = {a + b}")
                if (a + b) % 3 == 0:  # worded forms of some sums
                    docs.append(f"{NUM_WORDS[a]} plus {NUM_WORDS[b]} equals {a + b}.")
        return docs

    @staticmethod
    def filler(rng: random.Random, n: int) -> list[str]:
        out = []
        for _ in range(n):
            k = rng.randrange(3)
            if k == 0:
                out.append(f"{rng.choice(_TIME)}, the {rng.choice(_PEOPLE)} {rng.choice(_VERB)} the "
                           f"{rng.choice(_ADJ)} {rng.choice(_NOUN)}.")
            elif k == 1:
                out.append(f"The {rng.choice(_ADJ)} {rng.choice(_NOUN)} is near the {rng.choice(_NOUN)}.")
            else:
                out.append(f"The {rng.choice(_PEOPLE)} {rng.choice(_VERB)} the {rng.choice(_NOUN)} and then "
                           f"{rng.choice(_VERB)} the {rng.choice(_ADJ)} {rng.choice(_NOUN)}.")
        return out

    # -- evaluation prompts ---------------------------------------------------------------------------------
    def recall_prompts(self, split: str = "train") -> list[tuple[str, str, Fact]]:
        """(prompt, answer-with-leading-space, fact) for every fact and every template of ``split``."""
        out = []
        for f in self.facts:
            for t in self.relations[f.relation][split]:
                out.append((t.format(f.subject), " " + f.object, f))
        return out

    @staticmethod
    def sum_prompts() -> list[tuple[str, str]]:
        return [(f"{a}+{b}=", str(a + b)) for a in range(10) for b in range(10)]

    # -- persistence ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "subjects": list(self.subjects),
            "facts": [asdict(f) for f in self.facts],
            "cluster_name": self.cluster_name,
            "cluster": list(self.cluster),
            "novel_names": list(self.novel_names),
            "relations": self.relations,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "World":
        return cls(seed=d["seed"], subjects=tuple(d["subjects"]), facts=tuple(Fact(**f) for f in d["facts"]),
                   cluster=tuple(d["cluster"]), novel_names=tuple(d["novel_names"]), relations=d["relations"],
                   cluster_name=d["cluster_name"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "World":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _unique_words(rng: random.Random, n: int, lengths: tuple[int, ...], exclude: set[str] = frozenset(),
                  max_len: int = 9) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = _word(rng, rng.choice(lengths))
        if w not in out and w not in exclude and len(w) <= max_len:
            out.append(w)
    return out


def _word(rng: random.Random, n_syllables: int) -> str:
    w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n_syllables))
    return w.capitalize()
