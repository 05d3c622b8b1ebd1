"""A sentencepiece-style tokenizer as Llama 2 and Mistral ship it: Metaspace words, byte fallback, a BOS."""
from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from llmserve.master.tokenizer import CORPUS_PATH

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2, as in the tiny Llama checkpoints
BYTE_TOKENS = [f"<0x{byte:02X}>" for byte in range(256)]


def sentencepiece_tokenizer(decoder: str = "llama", vocab_size: int = 1024) -> Tokenizer:
    """A BPE trained on the builtin corpus (deterministic, ~20 ms) whose words start with `▁`.

    `decoder` "llama" is Llama 2's (replace `▁`, byte fallback, strip the first space), "metaspace"
    the Metaspace decoder newer conversions use; both drop the leading space of the first token decoded.
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + BYTE_TOKENS, min_frequency=1, show_progress=False
    )
    tokenizer.train([CORPUS_PATH], trainer)
    # The byte tokens were reserved as special tokens so they get ids; make them plain byte-fallback tokens.
    data = json.loads(tokenizer.to_str())
    data["added_tokens"] = [token for token in data["added_tokens"] if token["content"] in SPECIAL_TOKENS]
    data["model"]["byte_fallback"] = True
    tokenizer = Tokenizer.from_str(json.dumps(data))
    if decoder == "llama":
        tokenizer.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:
        tokenizer.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(replacement="\u2581", prepend_scheme="first")]
        )
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tokenizer


# tokenizer_config.json as Llama 2 repositories ship it beside tokenizer.model.
LLAMA2_TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False, "rstrip": False,
                  "single_word": False},
    "clean_up_tokenization_spaces": False,
    "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False, "rstrip": False,
                  "single_word": False},
    "legacy": False,
    "model_max_length": 4096,
    "pad_token": None,
    "padding_side": "right",
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
    "unk_token": {"__type": "AddedToken", "content": "<unk>", "lstrip": False, "normalized": False, "rstrip": False,
                  "single_word": False},
}


def save_sentencepiece_model(path, vocab_size: int = 1024, **config) -> None:
    """A real sentencepiece `tokenizer.model` trained as Llama's (BPE, byte fallback, split digits, no
    normalization, ids 0-2 unk/bos/eos) on the builtin corpus (~20 ms), and Llama 2's tokenizer_config.json
    (`config` overrides its keys), in the directory `path`."""
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        input=CORPUS_PATH, model_prefix=str(path / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, num_threads=1,
        minloglevel=2,
    )
    (path / "tokenizer.vocab").unlink()
    (path / "tokenizer_config.json").write_text(json.dumps({**LLAMA2_TOKENIZER_CONFIG, **config}, indent=2))
