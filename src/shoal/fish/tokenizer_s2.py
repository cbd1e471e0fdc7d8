"""The Fish Speech S2 tokenizer: a Hugging Face `tokenizer.json` (Qwen3's byte-level BPE plus fish's added tokens),
read with the `tokenizers` library, giving the ids the reference gets from transformers' `AutoTokenizer`.

The reference encodes with `encode(text, add_special_tokens=False)` on a `PreTrainedTokenizerFast`. Beyond the raw
`tokenizers.Tokenizer`, that does the following, each reproduced or refused here:

- tokens that `tokenizer_config.json` declares (`added_tokens_decoder`, and the named special tokens: eos, pad,
  `additional_special_tokens`, ...) but `tokenizer.json` lacks, or holds with other settings, are added by
  transformers at load time. Such a pair of files is refused (CheckpointError naming the token): the official
  files agree, and then the ids are `tokenizer.json`'s alone. A tokenizer_config.json without
  `added_tokens_decoder` (transformers then reads special_tokens_map.json and added_tokens.json) is refused too;
- `split_special_tokens` (tokenizer_config.json, default false) decides whether special tokens written in the
  text are parsed as one id each; it is set on the tokenizer as transformers sets it (`encode_special_tokens`);
- truncation and padding stored in `tokenizer.json` are switched off for an encode without those options;
- normalisation (NFC for Qwen), pre-tokenisation, BPE and the inline matching of added tokens are the Rust
  tokenizer's own, the same code transformers calls; the post-processor does not run (add_special_tokens=False).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from os import PathLike
from pathlib import Path
from types import MappingProxyType

from tokenizers import Tokenizer

from shoal.errors import CheckpointError

from .tokenizer import IM_END_TOKEN, SemanticTokens

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# tokenizer_config.json's names for the special tokens transformers adds when the tokenizer lacks them.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# The settings of an added token that change how it is matched; tokenizer.json and tokenizer_config.json must agree.
ADDED_TOKEN_FLAGS = ("special", "single_word", "lstrip", "rstrip", "normalized")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"tokenizer file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a json object")
    return data


def _token_content(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken object with "content"."""
    return token.get("content") if isinstance(token, dict) else token


def check_tokenizer_config(tokenizer: Tokenizer, config: Mapping, source: Path) -> None:
    """Refuse a tokenizer_config.json that would make transformers add or change tokens of tokenizer.json."""
    added = tokenizer.get_added_tokens_decoder()
    declared = config.get("added_tokens_decoder")
    if not isinstance(declared, dict):
        # Without it transformers falls back to special_tokens_map.json and added_tokens.json (its legacy path).
        raise CheckpointError(f"{source} has no added_tokens_decoder (an older layout shoal does not read)")
    for key, spec in declared.items():
        token = added.get(int(key)) if str(key).isdigit() else None
        if token is None or not isinstance(spec, dict) or token.content != spec.get("content"):
            raise CheckpointError(f"{source} declares added token {key} = {_token_content(spec)!r}, which "
                                  f"{TOKENIZER_JSON} does not hold at that id")
        # An absent setting takes AddedToken's default, as transformers builds it: normalized = not special.
        defaults = dict.fromkeys(ADDED_TOKEN_FLAGS, False) | {"normalized": not spec.get("special", False)}
        differing = [flag for flag in ADDED_TOKEN_FLAGS if bool(spec.get(flag, defaults[flag])) != getattr(token, flag)]
        if differing:
            raise CheckpointError(f"{source} and {TOKENIZER_JSON} disagree on {', '.join(differing)} of added token "
                                  f"{token.content!r}")
    named = [_token_content(config.get(name)) for name in NAMED_SPECIAL_TOKENS]
    named += [_token_content(t) for t in config.get("additional_special_tokens") or []]
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    for content in named:
        if content is not None and content not in vocab:
            raise CheckpointError(f"{source} names special token {content!r}, which {TOKENIZER_JSON} lacks")


class S2Tokenizer(SemanticTokens):
    """`tokenizer.json` with the reference's ids and the engine-facing surface of `FishTokenizer` (encode, decode,
    the semantic range, `<|im_end|>`, vocab_size). Immutable after construction; safe to share between threads."""

    def __init__(self, tokenizer: Tokenizer, *, split_special_tokens: bool = False) -> None:
        tokenizer.no_truncation()
        tokenizer.no_padding()
        tokenizer.encode_special_tokens = split_special_tokens
        self._tokenizer = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        added = {token.content: token_id for token_id, token in tokenizer.get_added_tokens_decoder().items()}
        #: added token -> id (read-only view): the control, speaker and semantic tokens.
        self.special_ids: Mapping[str, int] = MappingProxyType(added)
        self._vocab_size = max(vocab.values()) + 1
        self._semantic_ids = self.semantic_table(vocab, "the tokenizer")
        if IM_END_TOKEN not in added:
            raise CheckpointError(f"the tokenizer lacks {IM_END_TOKEN}")

    # -- loading -----------------------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, checkpoint_dir: str | PathLike) -> "S2Tokenizer":
        """Load `tokenizer.json`, checked against `tokenizer_config.json`, from a checkpoint directory."""
        path = Path(checkpoint_dir)
        config = _read_json(path / TOKENIZER_CONFIG)
        if not (path / TOKENIZER_JSON).is_file():
            raise CheckpointError(f"tokenizer file {path / TOKENIZER_JSON} does not exist")
        try:
            tokenizer = Tokenizer.from_file(str(path / TOKENIZER_JSON))
        except Exception as exc:  # the Rust side raises plain Exceptions for any malformed tokenizer
            raise CheckpointError(f"cannot load {path / TOKENIZER_JSON}: {str(exc).splitlines()[0]}") from exc
        check_tokenizer_config(tokenizer, config, path / TOKENIZER_CONFIG)
        return cls(tokenizer, split_special_tokens=bool(config.get("split_special_tokens", False)))

    # -- ids ---------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """One more than the largest token id. The model's embedding may have more rows (S2-Pro has 155,776 for
        155,774 tokens); it may not have fewer."""
        return self._vocab_size

    # -- text --------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as the reference's `encode(text, add_special_tokens=False)` gives them: added
        tokens written in the text (`<|im_end|>`, `<|speaker:1|>`, ...) are one id each."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, added tokens included as written."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def __repr__(self) -> str:
        return (f"S2Tokenizer(vocab={self.vocab_size}, added={len(self.special_ids)}, "
                f"semantic={self.semantic_begin_id}..{self.semantic_end_id})")
