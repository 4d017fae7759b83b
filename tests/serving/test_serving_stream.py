"""Streamed text (``dllm.serving.stream``): complete characters only, no stop-string prefix, the same text whole."""

import pytest

from dllm.data.tokenizer import load_tokenizer
from dllm.serving.stream import Detokenizer, StopStrings, TextStream


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_multibyte_characters_never_split(tokenizer):
    text = "añb€c😀 d"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text.encode())  # one byte per token: characters span tokens
    detokenizer = Detokenizer(tokenizer)
    deltas = [detokenizer.push([i]) for i in ids] + [detokenizer.flush()]
    assert "".join(deltas) == text
    assert all(d.encode().decode() == d and "\ufffd" not in d for d in deltas)
    assert "" in deltas  # a partial character was held back at least once


class ReplacingTokenizer:
    """Decodes like byte-level BPE: an incomplete UTF-8 tail becomes U+FFFD."""

    def decode(self, ids, **kwargs):
        return bytes(ids).decode("utf-8", errors="replace")


def test_replacement_character_is_held_back():
    data = "é€x".encode()
    detokenizer = Detokenizer(ReplacingTokenizer())
    deltas = [detokenizer.push([b]) for b in data]
    assert deltas == ["", "é", "", "", "€", "x"]


@pytest.mark.parametrize(
    "pieces,stops,expected,stopped",
    [
        (["ab", "c", "de"], ["cd"], ["ab", "", ""], True),  # "c" could start "cd": held, then cut
        (["ab", "c", "xe"], ["cd"], ["ab", "", "cxe"], False),  # it did not: released with what follows
        (["hello wor", "ld"], ["world", "lo w"], ["hel"], True),  # the earliest stop wins
        (["x", "y"], [], ["x", "y"], False),
    ],
)
def test_stop_strings_never_leak_a_prefix(pieces, stops, expected, stopped):
    matcher = StopStrings(stops)
    out, done = [], False
    for piece in pieces:
        delta, done = matcher.push(piece)
        out.append(delta)
        if done:
            break
    assert (out, done) == (expected, stopped)


def test_text_stream_drops_the_stop_id_and_flushes_held_text(tokenizer):
    stream = TextStream(tokenizer, [tokenizer.eos_token_id], stops=["zz"])
    ids = tokenizer("abz", add_special_tokens=False).input_ids
    assert stream.push(ids[:2]) == "ab"
    assert stream.push(ids[2:]) == ""  # "z" may start "zz"
    assert stream.push([tokenizer.eos_token_id], last=True) == "z"
    assert stream.text == "abz" and not stream.stopped


def test_text_stream_counts_the_tokens_up_to_the_one_that_completed_a_stop_string(tokenizer):
    """One forward commits several tokens; those after the stop string's last token are not the response's."""
    stream = TextStream(tokenizer, [tokenizer.eos_token_id], stops=["cd"])
    ids = tokenizer("abcdef", add_special_tokens=False).input_ids
    assert stream.push(ids[:2]) == "ab" and stream.used == 2
    assert stream.push(ids[2:]) == "" and stream.stopped  # "c", "d" completes "cd"; "e", "f" were committed too
    assert stream.used == 2
    assert stream.push(ids[:1]) == "" and stream.used == 0  # nothing after the stop
    plain = TextStream(tokenizer, [tokenizer.eos_token_id])
    assert plain.push(ids) == "abcdef" and plain.used == len(ids)
