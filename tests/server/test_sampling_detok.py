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


@pytest.mark.parametrize("temperature", [1e-40, 1e-30])
def test_tiny_positive_temperature_behaves_like_greedy(temperature):
    # logits / 1e-40 overflow to inf; softmax of inf is NaN and multinomial would raise, which
    # fails the whole engine step (every request in the batch), not just this caller's
    logits = random_logits()
    assert sample_all(logits, SamplingParams(temperature=temperature)) == logits.argmax(-1).tolist()
    assert (
        sample_all(logits, SamplingParams(temperature=temperature, top_p=0.5)) == logits.argmax(-1).tolist()
    )
