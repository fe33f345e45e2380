"""SAM 3's text tokenizer (CLIP's byte-level BPE), without TensorFlow.

keras-hub's ``SAM3Tokenizer`` runs on TensorFlow ops; this one reads the same
vocabulary with Hugging Face's ``tokenizers`` (the ``concepts`` extra), from
either kind of preset:

- a keras-hub preset: ``assets/tokenizer/vocabulary.json`` and ``merges.txt``;
- a Hugging Face checkpoint: its ``tokenizer.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from sam_backend.errors import PromptError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
#: CLIP's pre-tokenisation: contractions, runs of letters, single digits, runs of other symbols.
_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class PhraseError(PromptError):
    """A concept phrase that cannot be used: empty, or longer than the text encoder reads."""


@dataclass(frozen=True)
class Tokens:
    """A phrase as the text encoder takes it.

    Attributes:
        ids: ``(length,)`` int32 token ids: start, the phrase, end, then end tokens as padding.
        mask: ``(length,)`` int32, 1 on the start, phrase and end tokens.
    """

    ids: np.ndarray
    mask: np.ndarray


def clip_bpe(vocabulary: dict[str, int], merges: list[tuple[str, str]]):
    """A ``tokenizers.Tokenizer`` that splits text as CLIP does, from a vocabulary and merge rules."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tokenizer = Tokenizer(models.BPE(vocab=vocabulary, merges=merges, end_of_word_suffix="</w>",
                                     continuing_subword_prefix="", fuse_unk=False, unk_token=None))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.RobertaProcessing(
        (EOS, vocabulary[EOS]), (BOS, vocabulary[BOS]), add_prefix_space=False, trim_offsets=False)
    return tokenizer


class ConceptTokenizer:
    """Turns a phrase into the fixed-length token ids and mask of SAM 3's text encoder.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` that adds the start and end tokens.
        sequence_length: the text encoder's context (32 for ``sam3_pcs``).
        end_id: the end token's id (also the padding, as SAM 3 pads).

    Example:
        >>> tok = ConceptTokenizer.from_preset("/models/sam3-tiny", sequence_length=32)  # doctest: +SKIP
        >>> tok("a glass bottle").mask.sum()  # doctest: +SKIP
        5
    """

    def __init__(self, tokenizer, sequence_length: int, end_id: int):
        self.tokenizer = tokenizer
        self.sequence_length = int(sequence_length)
        self.end_id = int(end_id)

    @property
    def max_phrase_tokens(self) -> int:
        """How many tokens a phrase may have (the context less the start and end tokens)."""
        return self.sequence_length - 2

    @classmethod
    def from_preset(cls, preset: str, sequence_length: int) -> "ConceptTokenizer":
        """Read the tokenizer of a keras-hub or Hugging Face SAM 3 preset (any ``from_preset`` source)."""
        from keras_hub.src.utils.preset_utils import check_file_exists, get_file

        if check_file_exists(preset, "assets/tokenizer/vocabulary.json"):
            with open(get_file(preset, "assets/tokenizer/vocabulary.json"), encoding="utf-8") as fp:
                vocabulary = json.load(fp)
            with open(get_file(preset, "assets/tokenizer/merges.txt"), encoding="utf-8") as fp:
                lines = [line.rstrip("\n") for line in fp]
            merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
            tokenizer = clip_bpe(vocabulary, merges)
        else:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(get_file(preset, "tokenizer.json"))
            tokenizer.no_padding()
            tokenizer.no_truncation()
        end_id = tokenizer.token_to_id(EOS)
        if end_id is None or tokenizer.token_to_id(BOS) is None:
            raise ValueError(f"The tokenizer of {preset} lacks CLIP's {BOS} and {EOS} tokens.")
        return cls(tokenizer, sequence_length, end_id)

    def __call__(self, phrase: str) -> Tokens:
        """The tokens of ``phrase``.

        Raises:
            PhraseError: the phrase is empty, or has more tokens than the text encoder reads.
        """
        text = " ".join(str(phrase).split())
        if not text:
            raise PhraseError("The concept phrase is empty: type a word or a short phrase, such as \"bottle\".")
        ids = self.tokenizer.encode(text).ids
        if len(ids) > self.sequence_length:
            raise PhraseError(
                f"The concept phrase {text[:60]!r} is {len(ids) - 2} tokens long; SAM 3 reads at most "
                f"{self.max_phrase_tokens} (about {self.max_phrase_tokens * 3 // 4} words). Shorten it.")
        padded = np.full(self.sequence_length, self.end_id, np.int32)
        padded[:len(ids)] = ids
        mask = np.zeros(self.sequence_length, np.int32)
        mask[:len(ids)] = 1
        return Tokens(padded, mask)
