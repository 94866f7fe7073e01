"""A byte-level BPE trained on the prepared training text, saved with the model.

Byte level means any text round-trips exactly (no unknown tokens). Padding side and max length
go into the constructor: transformers 5 does not save them when set afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    # Digits stay single tokens: a tiny model learns arithmetic over 10 digit tokens far more easily
    # than over hundreds of merged number tokens.
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        padding_side="left",  # generation batches: prompts end where the answer begins
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,  # else decode rewrites ' .' to '.': no exact round trip
    )
