"""The S2 tokenizer (tokenizer.json through the `tokenizers` library) against what transformers' AutoTokenizer gives
the reference, and its refusals of files that transformers would read differently."""

from __future__ import annotations

import json
import shutil

import pytest

from shoal.errors import CheckpointError
from shoal.fish.tokenizer_s2 import S2Tokenizer
from shoal.testing import S2_CONTROL_TOKENS, S2_SPEAKER_TOKENS, SEMANTIC_TOKENS, write_tiny_s2_tokenizer

# write_tiny_s2_tokenizer: 256 byte tokens and 20 merges, then the added tokens.
FIRST_ADDED = 276
IM_END = FIRST_ADDED + S2_CONTROL_TOKENS.index("<|im_end|>")
SEMANTIC_BEGIN = FIRST_ADDED + len(S2_CONTROL_TOKENS) + len(S2_SPEAKER_TOKENS)

# Ids that transformers 4.57.3 (AutoTokenizer -> Qwen2TokenizerFast, tokenizers 0.22.1) gives for
# `encode(text, add_special_tokens=False)` on write_tiny_s2_tokenizer's two files.
HF_IDS = [
    ("Hello  world<|im_end|>\n<|speaker:1|>the <|semantic:5|>",
     [72, 101, 274, 111, 32, 273, 268, 108, 100, 278, 10, 289, 256, 101, 32, 297]),
    ("e\u0301t\u00e9 caf\u00e9 \U0001F600 <|im_start|>user\n",  # NFC first: both spellings of é are one
     [195, 169, 116, 195, 169, 32, 99, 97, 102, 195, 169, 32, 240, 159, 152, 128, 32, 277, 117, 115, 260, 10]),
    ("<|im_end|><|im_end|>x<|voice|>  <|speaker:3|>", [278, 278, 120, 283, 32, 32, 291]),
    ("It's we'll THEY'RE 12345 3.14",
     [73, 116, 39, 115, 273, 101, 39, 274, 32, 84, 72, 69, 89, 39, 82, 69, 32, 49, 50, 51, 52, 53, 32, 51, 46, 49,
      52]),
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("s2tok")
    write_tiny_s2_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def tok(tok_dir):
    return S2Tokenizer.from_dir(tok_dir)


@pytest.fixture
def tok_copy(tok_dir, tmp_path):
    return shutil.copytree(tok_dir, tmp_path / "copy")


def edit_json(path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_ids_of_the_engine_facing_surface(tok):
    assert tok.im_end_id == IM_END == tok.token_id("<|im_end|>")
    assert (tok.semantic_begin_id, tok.semantic_end_id) == (SEMANTIC_BEGIN, SEMANTIC_BEGIN + SEMANTIC_TOKENS - 1)
    assert tok.num_semantic == SEMANTIC_TOKENS
    assert tok.vocab_size == tok.semantic_end_id + 1  # the semantic tokens come last
    assert tok.is_semantic(SEMANTIC_BEGIN) and not tok.is_semantic(SEMANTIC_BEGIN - 1)
    assert tok.encode("<|semantic:4095|>") == [tok.semantic_end_id]
    with pytest.raises(KeyError, match="not a special token"):
        tok.token_id("<|speaker:99|>")


@pytest.mark.parametrize("text, ids", HF_IDS)
def test_encode_gives_transformers_ids(tok, text, ids):
    assert tok.encode(text) == ids


def test_added_tokens_are_parsed_inline_and_text_is_bpe(tok):
    assert tok.encode("<|speaker:1|>") == [tok.token_id("<|speaker:1|>")]
    assert tok.encode("this") == [256 + 0, 256 + 13]  # the merges b"th" and b"is"
    assert tok.encode("<|speaker:1") == tok.encode("<|speaker") + tok.encode(":1")  # not a token: plain text


def test_decode_round_trip_and_range(tok):
    for text, _ in HF_IDS[2:]:
        assert tok.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_split_special_tokens_setting_is_honoured(tok_copy):
    edit_json(tok_copy / "tokenizer_config.json", lambda c: c.update(split_special_tokens=True))
    ids = S2Tokenizer.from_dir(tok_copy).encode("<|im_end|>")
    assert IM_END not in ids and len(ids) > 1


def test_truncation_stored_in_tokenizer_json_is_ignored(tok_copy, tok):
    edit_json(tok_copy / "tokenizer.json", lambda t: t.update(
        truncation={"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0}))
    text = HF_IDS[0][0]
    assert S2Tokenizer.from_dir(tok_copy).encode(text) == tok.encode(text)


def test_config_declaring_tokens_the_tokenizer_lacks_is_refused(tok_copy):
    edit_json(tok_copy / "tokenizer_config.json", lambda c: c["added_tokens_decoder"].update(
        {"9999": {"content": "<|new|>", "special": True}}))
    with pytest.raises(CheckpointError, match=r"declares added token 9999 = '<\|new\|>'"):
        S2Tokenizer.from_dir(tok_copy)


def test_config_disagreeing_on_a_token_setting_is_refused(tok_copy):
    edit_json(tok_copy / "tokenizer_config.json",
              lambda c: c["added_tokens_decoder"][str(IM_END)].update(lstrip=True))
    with pytest.raises(CheckpointError, match=r"disagree on lstrip of added token '<\|im_end\|>'"):
        S2Tokenizer.from_dir(tok_copy)


@pytest.mark.parametrize("dropped, accepted", [
    ("normalized", True),  # special tokens default to normalized=False, as tokenizer.json has it
    ("special", False),  # special defaults to False: not what tokenizer.json says
])
def test_absent_token_settings_take_added_token_defaults(tok_copy, dropped, accepted):
    edit_json(tok_copy / "tokenizer_config.json", lambda c: c["added_tokens_decoder"][str(IM_END)].pop(dropped))
    if accepted:
        assert S2Tokenizer.from_dir(tok_copy).im_end_id == IM_END
    else:
        with pytest.raises(CheckpointError, match="disagree on special of added token"):
            S2Tokenizer.from_dir(tok_copy)


def test_config_without_added_tokens_decoder_is_refused(tok_copy):
    edit_json(tok_copy / "tokenizer_config.json", lambda c: c.pop("added_tokens_decoder"))
    with pytest.raises(CheckpointError, match="has no added_tokens_decoder"):
        S2Tokenizer.from_dir(tok_copy)


def test_named_special_token_missing_from_the_tokenizer_is_refused(tok_copy):
    edit_json(tok_copy / "tokenizer_config.json", lambda c: c.update(bos_token="<|begin|>"))
    with pytest.raises(CheckpointError, match=r"names special token '<\|begin\|>'"):
        S2Tokenizer.from_dir(tok_copy)


def test_semantic_tokens_must_be_consecutive(tok_copy):
    """<|semantic:7|> renamed <|semantic:4096|> in both files: the ids of codes 0..4096 are no longer a run."""
    def rename(token):
        if token["content"] == "<|semantic:7|>":
            token["content"] = "<|semantic:4096|>"

    edit_json(tok_copy / "tokenizer.json", lambda t: [rename(a) for a in t["added_tokens"]])
    edit_json(tok_copy / "tokenizer_config.json", lambda c: [rename(a) for a in c["added_tokens_decoder"].values()])
    with pytest.raises(CheckpointError, match="consecutive ids"):
        S2Tokenizer.from_dir(tok_copy)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_missing_or_corrupt_files_are_checkpoint_errors(tok_copy, name):
    (tok_copy / name).write_text("{broken")
    with pytest.raises(CheckpointError, match=f"cannot (read|load) .*{name}"):
        S2Tokenizer.from_dir(tok_copy)
    (tok_copy / name).unlink()
    with pytest.raises(CheckpointError, match=f"{name} does not exist"):
        S2Tokenizer.from_dir(tok_copy)
