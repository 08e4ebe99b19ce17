"""A word-level tokenizer for the built-in benchmark, built with `tokenizers`, saved as a Hugging Face fast
tokenizer (offsets included) in a plain, chat-free format.

Pre-tokenization splits text into words with their leading space (" ramen"), single digits (" 3", "0"), single
punctuation marks ("\\", "{", "-"), and runs of other whitespace ("\\n"). The vocabulary is every such piece in a
corpus (the benchmark's prompts and traces), plus ASCII letters, digits and punctuation, with and without a
leading space, so unseen words still encode (letter by letter) rather than collapse to <unk>. The decoder
concatenates pieces, so decode(encode(text)) == text for anything the vocabulary covers, `\\boxed{-1}` included
(six tokens: `\\`, `boxed`, `{`, `-`, `1`, `}`).
"""

import re
import string
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, EOS = "<|pad|>", "<|unk|>", "<|endoftext|>"
SPECIALS = (PAD, UNK, EOS)
_PIECE = r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]|\s+"
_PIECE_RE = re.compile(_PIECE)


def pieces(text: str) -> list[str]:
    """The pre-tokenizer's split, in Python (used to collect the vocabulary)."""
    return _PIECE_RE.findall(text)


def build_tokenizer(corpus: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer whose vocabulary covers `corpus`; deterministic (sorted vocabulary)."""
    found = set()
    for text in corpus:
        found.update(pieces(text))
    # every word both with and without its leading space, so a known word is known at any position
    found |= {p.strip() for p in found if p.strip().isalpha()} | {" " + p.strip() for p in found if p.strip().isalpha()}
    fallback = set(string.ascii_letters + string.digits + string.punctuation)
    fallback |= {" " + c for c in fallback} | {"\n", " ", "\n\n"}
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for tok in sorted(found | fallback):
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECE), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        pad_token=PAD,
        eos_token=EOS,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path: str | Path) -> None:
    tokenizer.save_pretrained(str(path))
