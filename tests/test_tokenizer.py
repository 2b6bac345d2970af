"""Tokenizer: byte-level round trip, special tokens, digits, chat template parity with HF, SFT mask."""

from __future__ import annotations

import json
import random

import pytest

from nanoseek.data.corpus import plain_text_documents
from nanoseek.data.tokenizer import (ASSISTANT, BOS, CHAT_TEMPLATE, EOS, END_THINK, PAD, SPECIAL_TOKENS, THINK,
                                     USER, Tokenizer, TokenizerError)


def _training_texts() -> list[str]:
    texts = [d.text for d in plain_text_documents()]
    # numbers that BPE would love to merge if digits were not split one by one
    texts += [f"Question: What is {a} + {b}?\nAnswer: {a + b}\n" for a in range(10, 60) for b in (12, 123, 2024)]
    return texts


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(_training_texts(), vocab_size=500)


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory):
    return tok.save(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def random_unicode(rng: random.Random, max_len: int = 40) -> str:
    """A random string mixing ASCII, control characters (NUL included), Latin, CJK, emoji, combining
    marks, RTL, zero-width characters, private use and noncharacters; no lone surrogates."""
    pools = [
        (0x20, 0x7E), (0x00, 0x1F), (0x7F, 0x9F), (0xA0, 0x24F), (0x300, 0x36F), (0x590, 0x6FF),
        (0x4E00, 0x4FFF), (0x3040, 0x30FF), (0xAC00, 0xAC80), (0x1F300, 0x1F64F), (0x1F900, 0x1F9FF),
        (0x200B, 0x200F), (0xE000, 0xE010), (0xFFF0, 0xFFFF), (0x10FFF0, 0x10FFFF),
    ]
    out = []
    for _ in range(rng.randint(0, max_len)):
        r = rng.random()
        if r < 0.05:
            out.append(rng.choice(list(SPECIAL_TOKENS) + ["<think", "｜", "▁", "Ġ", "\r\n", "  "]))
        elif r < 0.35:
            out.append(rng.choice(" \n\t0123456789"))
        else:
            lo, hi = rng.choice(pools)
            out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_special_tokens_are_single_ids_in_deepseek_order(tok):
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == token_id
        assert tok.encode(token) == [token_id], token
        assert tok.decode([token_id]) == token
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.think_id, tok.end_think_id) == (0, 1, 2, 5, 6)
    assert tok.stop_ids == (1,) and tok.think_tags == (THINK, END_THINK) and tok.chat_template == CHAT_TEMPLATE
    assert tok.encode(f"a{THINK}b{END_THINK}c").count(tok.think_id) == 1
    assert tok.encode("hi", add_bos=True)[0] == tok.bos_id
    assert tok.encode("hi", add_bos=False)[0] != tok.bos_id
    assert tok.vocab_size == 500


def test_digits_are_split_one_by_one(tok):
    # The training texts repeat 12, 123 and 2024 hundreds of times: still one token per digit.
    for number in ("12", "123", "2024", "9876543210"):
        ids = tok.encode(number)
        assert [tok.decode([i]) for i in ids] == list(number)
    ids = tok.encode("What is 123 + 2024?")
    assert [tok.decode([i]) for i in ids if tok.decode([i]).isdigit()] == list("1232024")


def test_random_unicode_round_trips(tok):
    rng = random.Random(0)
    for _ in range(400):
        s = random_unicode(rng)
        assert tok.decode(tok.encode(s)) == s, repr(s)
    for s in ["", "\x00", "\x00\x00abc\x00", "😀👍🏽👨‍👩‍👧", "中文字符测试", "e\u0301", "\ufeff\ufffd", "a\r\nb\rc",
              " " * 17, "\U0010ffff", BOS + BOS + "x" + EOS]:
        assert tok.decode(tok.encode(s)) == s, repr(s)


def test_decoding_arbitrary_ids_never_fails(tok):
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 20))]
        assert isinstance(tok.decode(ids), str)
    # one byte of a multi-byte character decodes to the replacement character, not an error
    first_byte_of_euro = tok.encode("€")[0]
    assert len(tok.encode("€")) == 3 and tok.decode([first_byte_of_euro]) == "\ufffd"


def test_lone_surrogate_is_a_clear_error(tok):
    with pytest.raises(TokenizerError, match="surrogate"):
        tok.encode("abc\ud800")


def test_save_load_and_hash(tok, tok_dir, tmp_path):
    loaded = Tokenizer.load(tok_dir)
    assert loaded.hash == tok.hash and loaded.vocab_size == tok.vocab_size
    text = "The fox counted 37 pebbles. 🦊"
    assert loaded.encode(text) == tok.encode(text)
    # the hash is of the canonical JSON: reformatting the file does not change it
    compact = tmp_path / "compact"
    compact.mkdir()
    spec = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    (compact / "tokenizer.json").write_text(json.dumps(spec, separators=(",", ":")), encoding="utf-8")
    assert Tokenizer.load(compact).hash == tok.hash
    # ...but another vocabulary changes it, and training is deterministic
    assert Tokenizer.train(_training_texts(), 450).hash != tok.hash
    assert Tokenizer.train(_training_texts(), 500).hash == tok.hash
    config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["bos_token"] == BOS and config["eos_token"] == EOS and config["pad_token"] == PAD


def test_bad_vocab_size_and_missing_files(tmp_path):
    with pytest.raises(TokenizerError, match="too small"):
        Tokenizer.train(["abc"], vocab_size=100)
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        Tokenizer.load(tmp_path)


CHATS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "Answer: 4", "reasoning": "2 + 2 = 4"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Count to 3 ✓"},
     {"role": "assistant", "content": "1 2 3", "reasoning": ""}],
    [{"role": "system", "content": "one"}, {"role": "user", "content": "a"}, {"role": "system", "content": "two"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": f"literal {THINK} and {EOS} 中文\n\n"}],
    [{"role": "assistant", "content": "I speak first."}],
]


@pytest.mark.parametrize("chat", range(len(CHATS)))
@pytest.mark.parametrize("gen", [False, True])
def test_chat_template_matches_transformers(tok, hf_tok, chat, gen):
    messages = CHATS[chat]
    ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
    theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert ours == theirs
    ids, mask = tok.encode_chat(messages, add_generation_prompt=gen)
    assert tok.decode(ids) == ours
    hf_ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
    hf_ids = list(hf_ids["input_ids"] if not isinstance(hf_ids, list) else hf_ids)
    if chat == 3:  # content holding control-token strings: text for us, control tokens for transformers
        assert tok.think_id in hf_ids and tok.think_id not in ids
    else:  # ordinary content: the same ids as transformers
        assert ids == tok.encode(ours) == hf_ids
    assert len(mask) == len(ids)


def test_chat_rendering_and_think_generation_prompt(tok, hf_tok):
    rendered = tok.apply_chat_template(CHATS[1], add_generation_prompt=False)
    assert rendered == f"{BOS}{USER}What is 2 + 2?{ASSISTANT}{THINK}\n2 + 2 = 4\n{END_THINK}\n\nAnswer: 4{EOS}"
    prompt = tok.apply_chat_template(CHATS[0], add_generation_prompt=True, thinking=True)
    assert prompt.endswith(f"{ASSISTANT}{THINK}\n")
    assert prompt == hf_tok.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True, thinking=True)
    assert tok.apply_chat_template(CHATS[0], add_generation_prompt=True, thinking=False).endswith(ASSISTANT)
    # HF sees the same BOS, special tokens and decoding; <think> stays visible like in R1
    assert hf_tok("What is 12?")["input_ids"] == tok.encode("What is 12?", add_bos=True)
    assert hf_tok.bos_token_id == tok.bos_id and hf_tok.eos_token_id == tok.eos_id
    assert hf_tok.pad_token_id == tok.pad_id
    ids = tok.encode(f"{THINK}x{END_THINK}y{EOS}")
    assert hf_tok.decode(ids, skip_special_tokens=True) == f"{THINK}x{END_THINK}y"


def test_assistant_mask_covers_assistant_text_and_eos_only(tok):
    messages = CHATS[2]
    ids, mask = tok.encode_chat(messages)
    trained = [i for i, m in zip(ids, mask) if m]
    untrained = [i for i, m in zip(ids, mask) if not m]
    assert tok.decode(trained) == f"Hello.{EOS}{THINK}\n\n{END_THINK}\n\n1 2 3{EOS}"
    assert tok.decode(untrained) == f"{BOS}You are terse.{USER}Hi{ASSISTANT}{USER}Count to 3 ✓{ASSISTANT}"
    # the generation prompt's header is not trained on
    ids, mask = tok.encode_chat(CHATS[0], add_generation_prompt=True)
    assert ids[-1] == tok.token_to_id(ASSISTANT) and not any(mask)


def test_malformed_messages_are_refused(tok, hf_tok):
    with pytest.raises(TokenizerError, match="unknown chat role: narrator"):
        tok.apply_chat_template([{"role": "narrator", "content": "x"}])
    with pytest.raises(Exception, match="unknown chat role: narrator"):
        hf_tok.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)
    with pytest.raises(TokenizerError, match="message 0.*content"):
        tok.apply_chat_template([{"role": "user", "content": None}])
    with pytest.raises(TokenizerError, match="reasoning"):
        tok.apply_chat_template([{"role": "user", "content": "x", "reasoning": "y"}])


def test_tokenizer_cli_train_and_encode(tmp_path, capsys):
    from nanoseek.cli import main

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"body": t}) + "\n" for t in _training_texts()), encoding="utf-8")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(corpus), "--text-field", "body",
                 "--vocab-size", "320", "--out", str(out)]) == 0
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 320
    assert main(["tokenizer", "encode", "--tokenizer", str(out), "12 apples"]) == 0
    assert "round trip ok: True" in capsys.readouterr().out
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "100", "--out", str(out)]) == 2
    assert "too small" in capsys.readouterr().err
