"""A character-level Hugging Face tokenizer: every symbol is one token, loadable by AutoTokenizer (and vLLM)."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>")
# Printable ASCII; the zoo's second language adds its own letters through `extra`.
ASCII = "".join(chr(c) for c in range(32, 127))


def char_tokenizer(extra: str = "", model_max_length: int = 256, add_bos: bool = False) -> PreTrainedTokenizerFast:
    symbols = list(dict.fromkeys(ASCII + extra))
    vocab = {tok: i for i, tok in enumerate([*SPECIAL, *symbols])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    if add_bos:  # trained models saw <bos> first; the template makes every loader (HF, vLLM) prepend it
        core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        padding_side="left",
    )


def save_char_tokenizer(directory: str | Path, extra: str = "", add_bos: bool = False) -> PreTrainedTokenizerFast:
    tok = char_tokenizer(extra, add_bos=add_bos)
    tok.save_pretrained(str(directory))
    return tok
