"""The testbed's tokenizer: a `tokenizers` WordLevel model over world.VOCAB, loadable with transformers.

Pre-tokenisation is `Whitespace` (pieces `\\w+|[^\\w\\s]+`), so tokenising "A B" gives tokens(A) + tokens(B)
whenever A and B meet at a space: the judge's token-space templating relies on this. Encoding with special
tokens prepends <bos> (a TemplateProcessing post-processor), as Llama tokenizers do; <eos> is never appended.
Token ids equal positions in world.VOCAB.
"""
from __future__ import annotations

import os

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from rlaif_jax.testbed import world


def build_tokenizer() -> tokenizers.Tokenizer:
    """The raw `tokenizers.Tokenizer` for world.VOCAB."""
    tok = tokenizers.Tokenizer(models.WordLevel(vocab=dict(world.WORD_TO_ID), unk_token=world.UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{world.BOS} $A", pair=f"{world.BOS} $A $B:1", special_tokens=[(world.BOS, world.BOS_ID)])
    # Decoding joins pieces with single spaces, so decode(encode(text)) == " ".join(world.split_words(text)).
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(list(world.SPECIAL_TOKENS))
    return tok


def save_tokenizer(out_dir: str) -> str:
    """Writes tokenizer.json + tokenizer_config.json (+ special_tokens_map.json) into out_dir; returns out_dir.

    `transformers.AutoTokenizer.from_pretrained(out_dir)` then loads it (pads on the left, as rollouts need).
    """
    from transformers import PreTrainedTokenizerFast  # imported here: transformers is slow to import

    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(), bos_token=world.BOS, eos_token=world.EOS, pad_token=world.PAD,
        unk_token=world.UNK, padding_side="left", clean_up_tokenization_spaces=False,
        model_max_length=1024)
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir
