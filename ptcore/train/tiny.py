"""The embedded model: a tiny Llama-architecture config and a character-level tokenizer (a
Hugging Face fast tokenizer over a ``tokenizers`` word-level model of single characters).

Everything here runs with no download, so ``ptcore sft|dpo|grpo --model tiny`` and ``ptcore demo``
work from a fresh install. ``load_model_and_tokenizer`` also opens directories ptcore saved and any
local Hugging Face checkpoint, so the loops take one ``--model`` argument for all three cases.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jinja2
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import BatchEncoding, LlamaConfig, PreTrainedTokenizerFast

TOKENIZER_FILE = "ptcore_tokenizer.json"

# Special tokens first (fixed ids), then printable ASCII and newline. Role markers are single
# tokens so the chat template costs one id per turn; eos also ends every chat turn, which makes
# generation stop at the end of the assistant's answer.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>")
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))

# bos, then <|role|>content</s> per message; the {% generation %} span (an assistant's content and
# the eos ending its turn, what the model must learn to emit) is return_assistant_tokens_mask's.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ('system', 'user', 'assistant') or message['content'] is not string %}"
    "{{ raise_exception('conversation[' ~ loop.index0 ~ ']: needs role in system/user/assistant and "
    "str content, got ' ~ message) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}"
    "{% endgeneration %}{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


class CharTokenizer(PreTrainedTokenizerFast):
    """Character-level tokenizer: a ``tokenizers`` word-level model over single characters, as a
    Hugging Face fast tokenizer.

    One id per character (printable ASCII and newline) plus the special tokens ``<pad>`` (0),
    ``<s>`` (1, bos), ``</s>`` (2, eos) and the chat role markers. Special-token strings inside a
    text are encoded as their single id. A character outside the vocabulary raises ``ValueError``
    naming it and its position: a character model silently mapping text to an unknown id would
    train on corrupted data.
    """

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, characters: str = CHARACTERS, special_tokens=SPECIAL_TOKENS, *,
                 padding_side: str = "right", model_max_length: int = 1024, **unused):
        if len(set(characters)) != len(characters):
            raise ValueError("characters: every character must appear once")
        special_tokens = tuple(special_tokens)
        if special_tokens[:3] != SPECIAL_TOKENS[:3]:
            raise ValueError(f"special_tokens must start with {SPECIAL_TOKENS[:3]}, got {special_tokens[:3]}")
        self.characters, self.special_tokens = characters, special_tokens
        vocab = {t: i for i, t in enumerate(special_tokens + tuple(characters))}
        backend = Tokenizer(models.WordLevel(vocab=vocab))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()
        backend.post_processor = processors.TemplateProcessing(
            single=f"{special_tokens[1]} $A", special_tokens=[(special_tokens[1], 1)])
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
        # specials (longest first, so a longer one wins over a prefix of it) or an unknown character
        self._unknown = re.compile("|".join(re.escape(t) for t in sorted(special_tokens, key=len, reverse=True))
                                   + "|([^" + re.escape(characters) + "])")
        super().__init__(tokenizer_object=backend, pad_token=special_tokens[0], bos_token=special_tokens[1],
                         eos_token=special_tokens[2], extra_special_tokens=list(special_tokens[3:]),
                         padding_side=padding_side, model_max_length=model_max_length,
                         clean_up_tokenization_spaces=False, chat_template=CHAT_TEMPLATE, name_or_path="tiny")

    def _check(self, text) -> None:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        bad = next((m for m in self._unknown.finditer(text) if m.group(1) is not None), None)
        if bad is not None:
            c = bad.group(1)
            raise ValueError(f"text: character {c!r} (U+{ord(c):04X}) at position {bad.start()} is not in "
                             "the character tokenizer's vocabulary (printable ASCII and newline)")

    def encode(self, text, add_special_tokens: bool = True, **kwargs) -> list[int]:
        """Ids of ``text``, with a bos id first for ``add_special_tokens`` (as Llama tokenizers do;
        it is the second positional argument: there are no text pairs)."""
        return super().encode(text, add_special_tokens=add_special_tokens, **kwargs)

    def _encode_plus(self, text, text_pair=None, **kwargs):
        if text_pair is not None:
            raise ValueError("text_pair: the character tokenizer does not encode pairs")
        for t in [text] if isinstance(text, str) or not isinstance(text, (list, tuple)) else text:
            self._check(t)
        return super()._encode_plus(text, **kwargs)

    def _decode(self, token_ids, *args, **kwargs) -> str:
        for i in [token_ids] if isinstance(token_ids, int) else token_ids:
            if not 0 <= i < len(self):
                raise ValueError(f"token id {i} is out of range [0, {len(self)})")
        return super()._decode(token_ids, *args, **kwargs)

    def apply_chat_template(self, conversation, **kwargs):
        """Hugging Face's, with the template's validation errors as ``ValueError``, and an empty
        conversation rendered (bos, and the generation prompt) rather than refused: the assistant
        spans of a conversation that opens with an assistant turn start there (ptcore.train.data)."""
        empty = isinstance(conversation, (list, tuple)) and not conversation
        try:
            out = super().apply_chat_template([[]] if empty else conversation, **kwargs)
        except jinja2.TemplateError as e:
            raise ValueError(str(e)) from e
        if not empty or kwargs.get("return_tensors") is not None and kwargs.get("tokenize", True):
            return out
        return BatchEncoding({k: v[0] for k, v in out.items()}) if isinstance(out, BatchEncoding) else out[0]

    # -- persistence: one small JSON file (the tokenizer is defined by these few fields) ---------
    def save_pretrained(self, save_directory, **unused) -> tuple[str]:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        state = {"type": "ptcore.CharTokenizer", "version": 1, "characters": self.characters,
                 "special_tokens": list(self.special_tokens), "padding_side": self.padding_side,
                 "model_max_length": self.model_max_length}
        tmp = path / (TOKENIZER_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, path / TOKENIZER_FILE)  # atomic: a killed save never leaves half a file
        return (str(path / TOKENIZER_FILE),)

    @classmethod
    def from_pretrained(cls, path, **unused) -> "CharTokenizer":
        file = Path(path) / TOKENIZER_FILE if Path(path).is_dir() else Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"path: no {TOKENIZER_FILE} in {path}")
        try:
            state = json.loads(file.read_text())
            if state.get("type") != "ptcore.CharTokenizer":
                raise ValueError(f"type is {state.get('type')!r}")
            tok = cls(state["characters"], state["special_tokens"],
                      padding_side=state.get("padding_side", "right"),
                      model_max_length=state.get("model_max_length", 1024))
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{file}: not a valid ptcore tokenizer file ({e})") from e
        tok.name_or_path = str(path)
        return tok


def tiny_config(**overrides) -> LlamaConfig:
    """A Llama config small enough to train from scratch on a CPU in minutes (~0.8M parameters:
    hidden 128, 4 layers, 4 query heads sharing 2 KV heads), sized for the CharTokenizer."""
    tok = CharTokenizer()
    kwargs = dict(vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=384,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
                  initializer_range=0.02, tie_word_embeddings=False,
                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def load_model_and_tokenizer(name_or_path="tiny", *, dtype=None, seed: int = 0, **config_overrides):
    """``"tiny"``: a fresh randomly initialized tiny Llama (seeded) and a CharTokenizer; a name of
    :mod:`ptcore.models` (``"smollm2-135m-instruct"``): its cached checkpoint (fetched on first use); a directory
    with a ptcore tokenizer file: that model and its CharTokenizer; any other local path: a
    Hugging Face causal LM and its tokenizer (``AutoModelForCausalLM`` / ``AutoTokenizer``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if str(name_or_path) == "tiny":
        tokenizer = CharTokenizer()
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(seed)
            model = LlamaForCausalLM(tiny_config(**config_overrides))
        if dtype is not None:
            model = model.to(dtype)
    else:
        from ptcore import models  # the other names: fetched once into the cache (ptcore.models)
        if str(name_or_path) in models.REAL_MODELS and not Path(name_or_path).is_dir():
            name_or_path = models.resolve(name_or_path)
        path = Path(name_or_path)
        if not path.is_dir():
            raise FileNotFoundError(f"name_or_path: {name_or_path!r} is neither a known model name "
                                    f"({', '.join(models.NAMES)}) nor a local model directory")
        if config_overrides:
            raise ValueError("config overrides apply only to the 'tiny' model")
        if (path / TOKENIZER_FILE).is_file():
            tokenizer = CharTokenizer.from_pretrained(path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path)
            if tokenizer.pad_token is None:  # many causal LMs ship without one; eos is standard
                tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    gen = model.generation_config
    gen.pad_token_id = tokenizer.pad_token_id
    if gen.eos_token_id is None:
        gen.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer
