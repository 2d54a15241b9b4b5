"""Token selection and incremental detokenization: what ends up in a client's text."""

from __future__ import annotations

import pytest
import torch

from hotlora.server.engine.detokenizer import IncrementalDetokenizer
from hotlora.server.engine.sampling import SamplingParams, make_generator, select_tokens

# ---- sampling ------------------------------------------------------------------------


def random_logits(rows: int = 64, vocab: int = 260, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3


def sample_all(logits, params: SamplingParams, seed: int = 0) -> list[int]:
    gens = [make_generator(seed + i) for i in range(logits.shape[0])]
    return select_tokens(logits, [params] * logits.shape[0], gens)


def test_greedy_is_argmax():
    logits = random_logits()
    assert sample_all(logits, SamplingParams()) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 5.0])
def test_top_k_1_equals_greedy(temperature):
    logits = random_logits()
    assert sample_all(logits, SamplingParams(temperature=temperature, top_k=1)) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 5.0])
def test_tiny_top_p_equals_greedy(temperature):
    logits = random_logits()
    assert (
        sample_all(logits, SamplingParams(temperature=temperature, top_p=1e-6)) == logits.argmax(-1).tolist()
    )


def test_top_k_only_picks_among_the_k_best():
    logits = random_logits(rows=1).expand(400, -1).contiguous()
    picks = sample_all(logits, SamplingParams(temperature=5.0, top_k=3))
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    assert set(picks) <= allowed
    assert len(set(picks)) == 3  # a hot temperature really spreads over all three


def test_top_p_only_picks_from_the_nucleus():
    logits = torch.full((400, 10), -10.0)
    logits[:, 0], logits[:, 1], logits[:, 2] = 2.0, 1.5, 1.0  # ~0.5, ~0.3, ~0.18 of the mass
    picks = sample_all(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert set(picks) == {0, 1}


def test_same_seed_same_tokens_different_seed_differs():
    logits = random_logits(rows=1)
    p = SamplingParams(temperature=1.0)
    run = lambda seed: [select_tokens(logits, [p], [g])[0] for g in [make_generator(seed)] for _ in range(40)]
    assert run(42) == run(42)
    assert run(42) != run(43)


def test_sampled_row_does_not_disturb_greedy_rows():
    logits = random_logits(rows=4)
    params = [
        SamplingParams(),
        SamplingParams(temperature=2.0),
        SamplingParams(),
        SamplingParams(temperature=2.0),
    ]
    out = select_tokens(logits, params, [make_generator(i) for i in range(4)])
    assert out[0] == int(logits[0].argmax()) and out[2] == int(logits[2].argmax())


# ---- incremental detokenizer ---------------------------------------------------------


def stream(tok, text: str, stop=()) -> tuple[list[str], IncrementalDetokenizer]:
    """Feed `text`'s tokens one at a time as the engine does; return the emitted pieces."""
    detok = IncrementalDetokenizer(tok, tuple(stop))
    pieces = []
    for t in tok(text)["input_ids"]:
        pieces.append(detok.add(t))
        if detok.stopped:
            return pieces, detok
    pieces.append(detok.flush())
    return pieces, detok


def test_multibyte_characters_arrive_whole(tiny_tok):
    text = "é€😀 ok"
    ids = tiny_tok(text)["input_ids"]
    assert len(ids) == len(text.encode()) > len(text)  # byte-level: characters span tokens
    pieces, _ = stream(tiny_tok, text)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # nothing is emitted mid-character: every non-empty piece is whole characters
    assert [p for p in pieces if p] == ["é", "€", "😀", " ", "o", "k"]


def test_stop_string_spanning_tokens_is_cut_and_never_leaked(tiny_tok):
    pieces, detok = stream(tiny_tok, "Hello world, STOP here", stop=["STOP"])
    assert detok.stopped
    assert "".join(pieces) == "Hello world, "
    assert not any("S" in p for p in pieces)  # the stop string's prefix was held back, not streamed


def test_held_back_prefix_is_released_when_it_is_not_a_stop(tiny_tok):
    pieces, detok = stream(tiny_tok, "STATE STOP", stop=["STOP"])
    assert "".join(pieces) == "STATE "
    pieces, detok = stream(tiny_tok, "all ST", stop=["STOP"])
    assert not detok.stopped and "".join(pieces) == "all ST"  # flushed at the end


def test_earliest_of_several_stop_strings_wins(tiny_tok):
    pieces, _ = stream(tiny_tok, "one two three four", stop=["four", "two"])
    assert "".join(pieces) == "one "


def test_multibyte_stop_string(tiny_tok):
    pieces, detok = stream(tiny_tok, "price: 5€ only", stop=["€"])
    assert detok.stopped and "".join(pieces) == "price: 5"


def test_stop_string_at_the_very_start_emits_nothing(tiny_tok):
    pieces, detok = stream(tiny_tok, "###rest", stop=["###"])
    assert detok.stopped and "".join(pieces) == ""


def test_special_tokens_are_not_in_the_text(tiny_tok):
    detok = IncrementalDetokenizer(tiny_tok)
    out = "".join(detok.add(t) for t in tiny_tok("hi")["input_ids"] + [tiny_tok.eos_token_id])
    assert out + detok.flush() == "hi"


class CountingTokenizer:
    """A tokenizer that counts the tokens and characters it decodes, whichever way it is asked."""

    def __init__(self, tok):
        self.tok, self.tokens, self.chars = tok, 0, 0

    def _count(self, n: int, text: str) -> str:
        self.tokens += n
        self.chars += len(text)
        return text

    def decode(self, ids, **kw) -> str:
        return self._count(len(ids), self.tok.decode(ids, **kw))

    def convert_tokens_to_string(self, tokens) -> str:
        return self._count(len(tokens), self.tok.convert_tokens_to_string(tokens))

    def convert_ids_to_tokens(self, ids, **kw):
        return self.tok.convert_ids_to_tokens(ids, **kw)


def test_a_long_completions_per_token_work_does_not_grow(tiny_tok):
    # 4,000 tokens of text with multi-byte characters (byte-level: up to 4 tokens a character) and a stop
    # string's prefixes ("ST" of "STOP") held back and released: the work of each token, in tokens and
    # characters decoded, is the same at the end as at the start (decoding the whole text at each token,
    # as before, decodes ~2,000 at the middle and ~4,000 at the end)
    text = ("Once upon a STATE, é€😀 ok. " * 200)[:4000]
    ids = tiny_tok(text)["input_ids"][:4000]
    assert len(ids) == 4000
    counting = CountingTokenizer(tiny_tok)
    detok = IncrementalDetokenizer(counting, ("STOP",))
    work, out = [], []
    for t in ids:
        before = (counting.tokens, counting.chars)
        out.append(detok.add(t))
        work.append((counting.tokens - before[0], counting.chars - before[1]))
    out.append(detok.flush())
    assert "".join(out) == tiny_tok.decode(ids)  # the same text as decoding the whole completion
    first, last = work[:1000], work[-1000:]
    assert max(max(w) for w in work) <= 16  # tokens and characters decoded for one token: a few
    assert sum(t for t, _ in last) <= sum(t for t, _ in first) * 1.1
    assert sum(c for _, c in last) <= sum(c for _, c in first) * 1.1


def test_a_sentencepiece_style_first_word_and_the_spaces_after_it_decode_as_the_whole_text():
    # a Metaspace decoder drops the first token's leading space: each step decodes its window after the
    # text already emitted (as context), so the spaces between words come out right
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["▁Hello", "▁world", "▁again", ",", "<unk>"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    ids = [0, 1, 3, 2, 1]
    detok = IncrementalDetokenizer(fast)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == fast.decode(ids) == "Hello world, again world"
    assert pieces[:3] == ["Hello", " world", ","]


@pytest.mark.parametrize("temperature", [1e-40, 1e-30])
def test_tiny_positive_temperature_behaves_like_greedy(temperature):
    # logits / 1e-40 overflow to inf; softmax of inf is NaN and multinomial would raise, which
    # fails the whole engine step (every request in the batch), not just this caller's
    logits = random_logits()
    assert sample_all(logits, SamplingParams(temperature=temperature)) == logits.argmax(-1).tolist()
    assert (
        sample_all(logits, SamplingParams(temperature=temperature, top_p=0.5)) == logits.argmax(-1).tolist()
    )
