"""The embedded model: a tiny Llama-architecture config and a character-level tokenizer.

Everything here runs with no download, so ``ptcore sft|dpo|grpo --model tiny`` and ``ptcore demo``
work from a fresh install. ``load_model_and_tokenizer`` also opens directories ptcore saved and any
local Hugging Face checkpoint, so the loops take one ``--model`` argument for all three cases.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import BatchEncoding, LlamaConfig

TOKENIZER_FILE = "ptcore_tokenizer.json"

# Special tokens first (fixed ids), then printable ASCII and newline. Role markers are single
# tokens so the chat template costs one id per turn; eos also ends every chat turn, which makes
# generation stop at the end of the assistant's answer.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>")
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))

# Same output as CharTokenizer._render_chat, for tools that render chat templates with Jinja.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>' + "
    "message['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


class CharTokenizer:
    """Character-level tokenizer with the parts of the Hugging Face tokenizer API the loops use.

    One id per character (printable ASCII and newline) plus the special tokens ``<pad>`` (0),
    ``<s>`` (1, bos), ``</s>`` (2, eos) and the chat role markers. Special-token strings inside a
    text are encoded as their single id, as Hugging Face tokenizers do. A character outside the
    vocabulary raises ``ValueError`` naming it and its position: a character model silently
    mapping text to an unknown id would train on corrupted data.
    """

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, characters: str = CHARACTERS, special_tokens=SPECIAL_TOKENS, *,
                 padding_side: str = "right", model_max_length: int = 1024):
        if len(set(characters)) != len(characters):
            raise ValueError("characters: every character must appear once")
        special_tokens = tuple(special_tokens)
        if special_tokens[:3] != SPECIAL_TOKENS[:3]:
            raise ValueError(f"special_tokens must start with {SPECIAL_TOKENS[:3]}, got {special_tokens[:3]}")
        self.characters = characters
        self.special_tokens = special_tokens
        self._vocab = {t: i for i, t in enumerate(special_tokens)}
        for c in characters:
            self._vocab[c] = len(self._vocab)
        self._inv = {i: t for t, i in self._vocab.items()}
        # Longest first, so a longer special token wins over a prefix of it.
        self._specials_by_len = sorted(special_tokens, key=len, reverse=True)
        self.padding_side = padding_side
        self.truncation_side = "right"
        self.model_max_length = model_max_length
        self.chat_template = CHAT_TEMPLATE
        self.name_or_path = "tiny"

    # -- vocabulary -----------------------------------------------------------------------------
    pad_token, bos_token, eos_token = SPECIAL_TOKENS[:3]
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def __len__(self) -> int:
        return len(self._vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    @property
    def all_special_tokens(self) -> list[str]:
        return list(self.special_tokens)

    @property
    def all_special_ids(self) -> list[int]:
        return [self._vocab[t] for t in self.special_tokens]

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {"pad_token": self.pad_token, "bos_token": self.bos_token, "eos_token": self.eos_token}

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            if tokens not in self._vocab:
                raise ValueError(f"tokens: {tokens!r} is not in the vocabulary")
            return self._vocab[tokens]
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._token(ids)
        return [self._token(int(i)) for i in ids]

    def _token(self, i: int) -> str:
        if i not in self._inv:
            raise ValueError(f"token id {i} is out of range [0, {self.vocab_size})")
        return self._inv[i]

    # -- encoding -------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        return self.convert_ids_to_tokens(self.encode(text, add_special_tokens=False))

    def encode(self, text: str, add_special_tokens: bool = True, *, truncation: bool = False,
               max_length: int | None = None, **unused) -> list[int]:
        """Ids of ``text``; with ``add_special_tokens`` a bos id first (as Llama tokenizers do)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = [self.bos_token_id] if add_special_tokens else []
        i, n = 0, len(text)
        while i < n:
            if text[i] == "<":
                special = next((s for s in self._specials_by_len if text.startswith(s, i)), None)
                if special is not None:
                    ids.append(self._vocab[special])
                    i += len(special)
                    continue
            c = text[i]
            tid = self._vocab.get(c)
            if tid is None:
                raise ValueError(f"text: character {c!r} (U+{ord(c):04X}) at position {i} is not in "
                                 "the character tokenizer's vocabulary (printable ASCII and newline)")
            ids.append(tid)
            i += 1
        if truncation and max_length is not None and len(ids) > max_length:
            ids = ids[:max_length] if self.truncation_side == "right" else ids[-max_length:]
        return ids

    def __call__(self, text, text_pair=None, *, add_special_tokens: bool = True, padding=False,
                 truncation: bool = False, max_length: int | None = None, return_tensors=None,
                 padding_side: str | None = None, return_attention_mask: bool = True, **unused):
        """Hugging Face style: a str or a list of str -> BatchEncoding(input_ids, attention_mask)."""
        if text_pair is not None:
            raise ValueError("text_pair: the character tokenizer does not encode pairs")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        ids = [self.encode(t, add_special_tokens, truncation=truncation, max_length=max_length)
               for t in texts]
        masks = [[1] * len(x) for x in ids]
        if padding or return_tensors is not None:
            ids, masks = self._pad(ids, masks, padding, max_length, padding_side or self.padding_side)
        data = {"input_ids": ids[0] if single and return_tensors is None else ids}
        if return_attention_mask:
            data["attention_mask"] = masks[0] if single and return_tensors is None else masks
        return BatchEncoding(data, tensor_type=return_tensors)

    def _pad(self, ids, masks, padding, max_length, side):
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        target = max((len(x) for x in ids), default=0)
        if padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            target = max_length
        elif not padding and len({len(x) for x in ids}) > 1:
            raise ValueError("return_tensors needs sequences of one length: pass padding=True")
        out_ids, out_masks = [], []
        for x, m in zip(ids, masks):
            pad = target - len(x)
            if side == "right":
                out_ids.append(x + [self.pad_token_id] * pad)
                out_masks.append(m + [0] * pad)
            else:
                out_ids.append([self.pad_token_id] * pad + x)
                out_masks.append([0] * pad + m)
        return out_ids, out_masks

    # -- decoding -------------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens: bool = False, **unused) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return "".join(self._token(int(i)) for i in ids if int(i) not in special)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **unused) -> list[str]:
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    # -- chat -----------------------------------------------------------------------------------
    def _render_chat(self, messages, add_generation_prompt: bool, continue_final_message: bool):
        """Pieces (text, is_assistant_content) of: bos, then <|role|>content</s> per message."""
        pieces = [(self.bos_token, False)]
        for k, msg in enumerate(messages):
            role, content = msg.get("role"), msg.get("content")
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise ValueError(f"conversation[{k}]: needs role in system/user/assistant and str "
                                 f"content, got {msg!r}")
            last = k == len(messages) - 1
            pieces.append((f"<|{role}|>", False))
            pieces.append((content, role == "assistant"))
            if not (last and continue_final_message):
                # the eos ending an assistant turn is part of what the model must learn to emit
                pieces.append((self.eos_token, role == "assistant"))
        if add_generation_prompt:
            if continue_final_message:
                raise ValueError("add_generation_prompt and continue_final_message are exclusive")
            pieces.append(("<|assistant|>", False))
        return pieces

    def apply_chat_template(self, conversation, *, add_generation_prompt: bool = False,
                            continue_final_message: bool = False, tokenize: bool = True,
                            padding=False, truncation: bool = False, max_length: int | None = None,
                            return_tensors=None, return_dict: bool = True,
                            return_assistant_tokens_mask: bool = False, **unused):
        """Like transformers 5: a string with ``tokenize=False``; else a BatchEncoding (input_ids,
        attention_mask, and ``assistant_masks`` on request) or, with ``return_dict=False``, ids."""
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        convs = conversation if batched else [conversation]
        rendered = [self._render_chat(c, add_generation_prompt, continue_final_message) for c in convs]
        if not tokenize:
            texts = ["".join(t for t, _ in p) for p in rendered]
            return texts if batched else texts[0]
        ids, amasks = [], []
        for pieces in rendered:
            seq, am = [], []
            for text, is_assistant in pieces:
                x = self.encode(text, add_special_tokens=False)
                seq += x
                am += [int(is_assistant)] * len(x)
            if truncation and max_length is not None:
                seq, am = seq[:max_length], am[:max_length]
            ids.append(seq)
            amasks.append(am)
        if not return_dict:
            if return_tensors is not None:
                ids, _ = self._pad(ids, [[1] * len(x) for x in ids], padding, max_length,
                                   self.padding_side)
                return BatchEncoding({"input_ids": ids}, tensor_type=return_tensors)["input_ids"]
            return ids if batched else ids[0]
        masks = [[1] * len(x) for x in ids]
        if padding or return_tensors is not None:
            side = self.padding_side
            (ids, masks), (amasks, _) = (self._pad(ids, masks, padding, max_length, side),
                                         self._pad(amasks, masks, padding, max_length, side))
        data = {"input_ids": ids, "attention_mask": masks}
        if return_assistant_tokens_mask:
            data["assistant_masks"] = amasks
        if not batched and return_tensors is None:
            data = {k: v[0] for k, v in data.items()}
        return BatchEncoding(data, tensor_type=return_tensors)

    # -- persistence ----------------------------------------------------------------------------
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

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, padding_side={self.padding_side!r})"


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
