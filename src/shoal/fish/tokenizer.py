"""The Fish Speech S1 tokenizer: byte-level BPE (tiktoken) plus a table of special tokens.

A checkpoint ships two files:

- `tokenizer.tiktoken`: one `base64(bytes) rank` pair per line, the BPE vocabulary;
- `special_tokens.json`: the special tokens in order. Their ids are NOT read from the json values: the
  reference numbers them `len(ranks) + position`, so that is what we do (and we log when the json disagrees).

Three details of the reference that change ids and are reproduced on purpose:

1. The pre-tokenisation regex. Its whitespace branch is spelt `\\s+(\\?!\\S)` with an escaped `?`: a literal
   "?!" after whitespace, not a negative lookahead. So a run of 2+ spaces before a word becomes a piece of its
   own (`hello  world` -> `hello`, `  `, `world`), and a whitespace run followed by "?!x" joins it in one piece.
2. Every special token written inside ordinary text is recognised as that special token.
3. Text is encoded in slices of 400,000 characters; BPE (and special-token matching) never spans two slices.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Iterable, Mapping
from os import PathLike
from pathlib import Path
from types import MappingProxyType

import tiktoken

from shoal.errors import CheckpointError

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.tiktoken"
SPECIAL_TOKENS_FILE = "special_tokens.json"

# fish's FISH_TIKTOKEN_PATTERN, branch by branch. Keep the escaped `?` in the 7th branch: see the module doc.
FISH_PATTERN = "|".join(
    [
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",
        r"\p{P}",
        r"[^\r\n\p{L}\p{N}]?\p{L}+",
        r"\p{N}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(\?!\S)",
        r"\s+",
    ]
)
# The reference encodes long texts slice by slice; the slicing is visible in the ids, so it is kept.
MAX_ENCODE_CHARS = 400_000

IM_END_TOKEN = "<|im_end|>"
INTERLEAVE_TOKEN = "<|interleave|>"
SEMANTIC_PREFIX = "<|semantic:"
SEMANTIC_RE = re.compile(r"<\|semantic:(\d+)\|>")


def read_ranks(path: Path) -> dict[bytes, int]:
    """Parse a `.tiktoken` file. Like the reference: blank lines and the `=` placeholder (the empty token, which
    fish writes but skips on reading) are ignored, and base64 is decoded leniently."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"tokenizer file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read tokenizer file {path}: {exc}") from exc
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            if token == "=":
                continue
            ranks[base64.b64decode(token)] = int(rank)
        except (ValueError, binascii.Error) as exc:
            raise CheckpointError(f"{path} line {number} is not `base64 rank`: {line[:60]!r}") from exc
    check_ranks(ranks, path)
    return ranks


def check_ranks(ranks: Mapping[bytes, int], path: Path) -> None:
    """Refuse vocabularies the reference would accept but then mis-encode or crash on: ranks must be exactly
    0..n-1 (specials are numbered from n, so a gap or a duplicate would give two tokens one id) and every
    single byte must be present (byte-level BPE falls back to single bytes)."""
    if not ranks:
        raise CheckpointError(f"tokenizer file {path} holds no tokens")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{path}: ranks must be exactly 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} single bytes have no token (first: {missing[0]:#04x})")


def read_special_tokens(path: Path) -> tuple[list[str], list | None]:
    """The special tokens of `special_tokens.json` in file order, and the ids the file states (None for a list).

    A json object (what fish writes, token -> id) or a plain list of strings is accepted. The stated ids are
    only compared with ours, never used: fish 0.1.0 numbers specials by position."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"special tokens file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read special tokens file {path}: {exc}") from exc
    tokens = list(data) if isinstance(data, (dict, list)) else None
    if not tokens or not all(isinstance(t, str) and t for t in tokens):
        raise CheckpointError(f"{path} must be a non-empty json object or list of special-token strings")
    if len(set(tokens)) != len(tokens):
        raise CheckpointError(f"{path} lists a special token twice")
    return tokens, (list(data.values()) if isinstance(data, dict) else None)


class SemanticTokens:
    """What the engine reads off either tokenizer (S1's `FishTokenizer`, S2's `S2Tokenizer`): the special tokens'
    ids and the semantic range. Subclasses set `special_ids` (token -> id) and `_semantic_ids` (`semantic_table`)."""

    special_ids: Mapping[str, int]
    _semantic_ids: list[int]

    @staticmethod
    def semantic_table(ids: Mapping[str, int], where: str) -> list[int]:
        """Token id of `<|semantic:i|>` for i = 0..N-1 among `ids` (`where` names them in errors). The model treats
        ids begin..end as codec codes, so the semantic tokens must be numbered consecutively from `<|semantic:0|>`;
        the real checkpoints are."""
        found: dict[int, int] = {}
        for token, token_id in ids.items():
            if token.startswith(SEMANTIC_PREFIX):
                match = SEMANTIC_RE.fullmatch(token)
                if match is None:
                    raise CheckpointError(f"malformed semantic token {token!r} in {where}")
                found[int(match.group(1))] = token_id
        if not found:
            raise CheckpointError(f"no <|semantic:N|> tokens in {where}")
        begin = found.get(0)
        table = [found.get(i) for i in range(max(found) + 1)]
        if begin is None or table != list(range(begin, begin + len(table))):
            raise CheckpointError("semantic tokens must run <|semantic:0|>..<|semantic:N|> with consecutive ids")
        return table

    @property
    def im_end_id(self) -> int:
        return self.special_ids[IM_END_TOKEN]

    @property
    def semantic_begin_id(self) -> int:
        """Id of `<|semantic:0|>`; code c of codebook 0 is token semantic_begin_id + c."""
        return self._semantic_ids[0]

    @property
    def semantic_end_id(self) -> int:
        """Id of the last semantic token (inclusive)."""
        return self._semantic_ids[-1]

    @property
    def num_semantic(self) -> int:
        return len(self._semantic_ids)

    def token_id(self, token: str) -> int:
        """Id of a special token, e.g. `token_id("<|im_end|>")`."""
        try:
            return self.special_ids[token]
        except KeyError:
            raise KeyError(f"{token!r} is not a special token of this tokenizer") from None

    def is_semantic(self, token_id: int) -> bool:
        return self.semantic_begin_id <= token_id <= self.semantic_end_id


class FishTokenizer(SemanticTokens):
    """BPE + specials with the reference's ids. Immutable after construction; safe to share between threads."""

    def __init__(self, ranks: dict[bytes, int], special_tokens: Iterable[str], *, name: str = "fish") -> None:
        self.num_bpe_tokens = len(ranks)
        special_ids = {tok: len(ranks) + i for i, tok in enumerate(special_tokens)}
        #: special token -> id (read-only view).
        self.special_ids: Mapping[str, int] = MappingProxyType(special_ids)
        self._semantic_ids = self.semantic_table(special_ids, "the special tokens")
        self._encoding = tiktoken.Encoding(
            name=name, pat_str=FISH_PATTERN, mergeable_ranks=dict(ranks), special_tokens=special_ids
        )
        self._all_specials = frozenset(self.special_ids)
        for required in (IM_END_TOKEN, INTERLEAVE_TOKEN):
            if required not in self.special_ids:
                raise CheckpointError(f"special tokens lack {required}")

    # -- loading -----------------------------------------------------------------------------------------------
    @classmethod
    def from_files(cls, tiktoken_path: str | PathLike, special_tokens_path: str | PathLike) -> "FishTokenizer":
        tiktoken_path, special_tokens_path = Path(tiktoken_path), Path(special_tokens_path)
        ranks = read_ranks(tiktoken_path)
        specials, stated_ids = read_special_tokens(special_tokens_path)
        try:
            tokenizer = cls(ranks, specials, name=tiktoken_path.stem)
        except CheckpointError as exc:
            raise CheckpointError(f"{special_tokens_path}: {exc}") from None
        if stated_ids is not None and stated_ids != list(tokenizer.special_ids.values()):
            logger.warning("%s: the ids in the file differ from len(ranks) + position; using the latter, as fish "
                           "does", special_tokens_path)
        return tokenizer

    @classmethod
    def from_dir(cls, checkpoint_dir: str | PathLike) -> "FishTokenizer":
        """Load `tokenizer.tiktoken` + `special_tokens.json` from a checkpoint directory.

        Unlike fish, a missing `special_tokens.json` is an error: fish would fall back to its built-in list
        with only 1024 semantic tokens, which silently mis-numbers an S1 checkpoint (4096)."""
        path = Path(checkpoint_dir)
        return cls.from_files(path / TOKENIZER_FILE, path / SPECIAL_TOKENS_FILE)

    # -- ids ---------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """BPE tokens + special tokens: the model's embedding rows. (fish's own `vocab_size` property returns only
        the BPE count; nothing on the inference path reads it.)"""
        return self.num_bpe_tokens + len(self.special_ids)

    @property
    def num_special_tokens(self) -> int:
        return len(self.special_ids)

    @property
    def interleave_id(self) -> int:
        return self.special_ids[INTERLEAVE_TOKEN]

    # -- text --------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with special tokens written in it recognised (the reference allows them all)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids: list[int] = []
        for start in range(0, len(text), MAX_ENCODE_CHARS):
            piece = text[start : start + MAX_ENCODE_CHARS]
            ids.extend(self._encoding.encode(piece, allowed_special=self._all_specials, disallowed_special=()))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD (tiktoken's and fish's default)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._encoding.decode(ids)

    def __repr__(self) -> str:
        return (f"FishTokenizer(bpe={self.num_bpe_tokens}, specials={self.num_special_tokens}, "
                f"semantic={self.semantic_begin_id}..{self.semantic_end_id})")
