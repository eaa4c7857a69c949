"""A byte-level BPE tokenizer trained on the world's text, built like GPT-2's.

Leading-space tokens, a byte-level alphabet (any string encodes), and per-token decodes that concatenate back
to the exact text - so scripts written for GPT-2 (ROME's ``find_token_range``) work unchanged. Fictional names
are seen only once each while the merges are learned, so they split into several sub-word pieces the way real
names do; a ``<|bos|>`` token is prepended to every encoding, exactly as during training.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from mechedit.toy.world import NUM_WORDS, World

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"


def tokenizer_training_text(world: World) -> list[str]:
    """Text the merges are learned from: the world's text with each name replaced by a placeholder, plus
    names drawn from the same syllables."""
    docs = []
    names = sorted(set(world.subjects) | set(world.novel_names), key=len, reverse=True)
    for d in world.corpus():
        for n in names:
            if n in d:
                d = d.replace(n, "Someone")
        docs.append(d)
    # Names are never seen whole: merges for name pieces come from other names drawn from the same syllables
    # (a different seed), so world names split into sub-word pieces as real names do in real LMs.
    other = World.generate(seed=world.seed + 1000, n_subjects=3000, n_cluster=0, n_novel=0)
    docs.extend(f"and {n}" for n in other.subjects if n not in names)
    docs.extend(f"{a} {b} {c}" for a in NUM_WORDS for b in range(20) for c in ("is", "and"))
    return docs


def build_tokenizer(world: World, vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_training_text(world), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=None,
        add_bos_token=True, clean_up_tokenization_spaces=False, model_max_length=128,
    )
