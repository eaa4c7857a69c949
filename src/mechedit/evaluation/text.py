"""Scores of generated text: ROME's fluency and consistency, and a detector of degenerate generation.

* **Fluency** is ROME's weighted n-gram entropy (``n_gram_entropy`` in ROME's ``experiments/py/eval_utils``):
  for each text, the entropy in bits of its bigram and trigram frequency distributions, weighted 2/3 and 4/3
  and averaged. Repetitive text has low entropy. ROME's tables print it ×100 (GPT-2 XL: 621.9 for 100-token
  samples); we report bits. Entropy grows with length, so compare texts of the same length only.
* **Consistency** is ROME's reference score: the cosine similarity of TF-IDF vectors of the generated text and
  of reference text about the *new* object (ROME: Wikipedia text about the target, IDF fitted on Wikipedia).
  :class:`TfIdf` is fitted on whatever corpus the caller has (the embedded world's own text, see
  :mod:`mechedit.evaluation.evaluate`).
* **Degeneration**: :func:`has_loop` flags a token n-gram (n ≤ 4) repeated three times in a row (a unigram
  four times), the repetition loop that broken edits fall into; :func:`target_share` is the fraction of words
  that are the new object, for collapse onto the target.

Words are ``\\w+`` runs and single punctuation characters (ROME used nltk's ``word_tokenize``, close to this
on plain prose).

>>> round(ngram_entropy("a b c d e f"), 3)
2.107
>>> has_loop([5, 6, 7, 6, 7, 6, 7])
True
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's ``compute_n_gram_entropy``: mean over ``ns`` of weight × entropy (bits) of the n-gram counts."""
    toks = words(text)
    out = []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        out.append(w * h)
    return sum(out) / len(out)


class TfIdf:
    """TF-IDF vectors with sklearn's smoothed IDF (``log((1 + N) / (1 + df)) + 1``), fitted on ``corpus``;
    words outside the corpus's vocabulary are ignored, as in ROME's fitted vectoriser."""

    def __init__(self, corpus: Iterable[str]):
        df: Counter = Counter()
        n = 0
        for doc in corpus:
            df.update(set(words(doc)))
            n += 1
        self.idf = {w: math.log((1 + n) / (1 + c)) + 1 for w, c in df.items()}

    def vector(self, text: str) -> dict[str, float]:
        tf = Counter(w for w in words(text) if w in self.idf)
        v = {w: c * self.idf[w] for w, c in tf.items()}
        norm = math.sqrt(sum(x * x for x in v.values()))
        return {w: x / norm for w, x in v.items()} if norm else {}

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of the two texts' TF-IDF vectors (0 when either has no known word)."""
        va, vb = self.vector(a), self.vector(b)
        return sum(x * vb.get(w, 0.0) for w, x in va.items())


def has_loop(tokens: Sequence[int], max_n: int = 4, repeats: int = 3) -> bool:
    """Whether some n-gram (1 ≤ n ≤ ``max_n``) occurs ``repeats`` times in a row (a unigram ``repeats + 1``
    times: "the the" happens in honest text, four in a row does not)."""
    toks = list(tokens)
    for n in range(1, max_n + 1):
        need = (repeats + 1 if n == 1 else repeats) * n
        for start in range(0, len(toks) - need + 1):
            gram = toks[start:start + n]
            if all(toks[start + j] == gram[j % n] for j in range(need)):
                return True
    return False


def target_share(text: str, target: str) -> float:
    """Fraction of the text's words that belong to ``target`` (a multi-word target counts each of its words)."""
    toks = words(text)
    want = set(words(target))
    return sum(t in want for t in toks) / len(toks) if toks else 0.0
