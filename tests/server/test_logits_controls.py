"""The sampling controls on hand-made logits: each changes exactly the logits it should, by the formula
vLLM documents; guided rows are masked and free rows in the same batch are not."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hotlora.server.engine.guided import GrammarEngine, GuidedKind, GuidedSpec
from hotlora.server.engine.logits_controls import choose_tokens
from hotlora.server.engine.requests import GenerationRequest
from hotlora.server.engine.sampling import SamplingParams, make_generator
from tests.tiny import VOCAB_SIZE, tiny_tokenizer

EOS = 2


def req(prompt=(5, 6), out=(), matcher=None, **params) -> GenerationRequest:
    r = GenerationRequest(list(prompt), SamplingParams(**params), matcher=matcher)
    r.output_ids = list(out)
    return r


def pick(logits, *reqs, gens=None):
    gens = gens or [make_generator(0) for _ in reqs]
    return choose_tokens(logits, list(reqs), gens, {EOS})


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.zeros(1, 10)
    logits[0, 5], logits[0, 7], logits[0, 8] = 4.0, -1.0, 3.0
    # 5 (prompt, +4 -> 2) and 7 (output, -1 -> -2) are seen; 8 (+3) is not: greedy now picks 8
    tokens, _ = pick(logits, req(prompt=(5,), out=(7,), repetition_penalty=2.0))
    assert tokens == [8]
    tokens, _ = pick(logits, req(prompt=(5,), out=(7,)))
    assert tokens == [5]


def test_presence_and_frequency_penalties_count_only_generated_tokens():
    logits = torch.zeros(1, 10)
    logits[0, 3], logits[0, 4] = 5.0, 3.5
    out = (3, 3, 3)  # token 3 generated three times; prompt tokens are not penalised
    assert pick(logits, req(prompt=(4,), out=out, presence_penalty=1.0))[0] == [3]  # 5 - 1 > 3.5
    assert pick(logits, req(prompt=(4,), out=out, presence_penalty=2.0))[0] == [4]  # 5 - 2 < 3.5
    assert pick(logits, req(prompt=(4,), out=out, frequency_penalty=0.4))[0] == [3]  # 5 - 1.2 > 3.5
    assert pick(logits, req(prompt=(4,), out=out, frequency_penalty=0.6))[0] == [4]  # 5 - 1.8 < 3.5


def test_logit_bias_and_min_tokens_hold_back_eos_and_stop_tokens():
    logits = torch.zeros(1, 10)
    logits[0, EOS] = 10.0
    assert pick(logits, req(logit_bias=((6, 11.0),)))[0] == [6]
    assert pick(logits, req(min_tokens=1))[0] != [EOS]
    logits[0, 9] = 20.0
    assert pick(logits, req(min_tokens=2, out=(1,), stop_token_ids=(9,)))[0] not in ([EOS], [9])
    assert pick(logits, req(min_tokens=2, out=(1, 1), stop_token_ids=(9,)))[0] == [9]  # reached


def test_logprobs_are_the_models_own_whatever_the_controls():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    _, entries = pick(logits, req(prompt=(0,), logprobs=2, logit_bias=((0, 50.0),)))
    expected = torch.log_softmax(logits[0], -1)
    assert entries[0].token_id == 0  # the bias chose it
    assert entries[0].logprob == pytest.approx(float(expected[0]))
    assert [t for t, _ in entries[0].top] == [2, 1]
    assert entries[0].top[0][1] == pytest.approx(float(expected[2]))
    assert pick(logits, req())[1] == [None]


def test_controlled_rows_leave_their_batch_neighbours_alone():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    plain = logits.argmax(-1).tolist()
    tokens, _ = pick(logits.clone(), req(), req(logit_bias=((0, 100.0),)), req())
    assert tokens == [plain[0], 0, plain[2]]


def test_a_seeded_row_samples_the_same_token_in_any_batch():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    alone = pick(logits[2:3], req(temperature=1.0), gens=[make_generator(42)])[0][0]
    crowded = pick(
        logits,
        *(req(temperature=1.0) for _ in range(4)),
        gens=[make_generator(i) for i in (7, 8, 42, 9)],
    )[0][2]
    assert alone == crowded


@pytest.fixture(scope="module")
def grammar():
    return GrammarEngine(tiny_tokenizer(), VOCAB_SIZE)


def _ids(text: str) -> list[int]:
    return tiny_tokenizer()(text)["input_ids"]


def test_a_guided_row_is_masked_and_a_free_row_beside_it_is_not(grammar):
    spec = GuidedSpec(GuidedKind.CHOICE, ("yes", "no"))
    guided = req(matcher=grammar.matcher(spec))
    logits = torch.zeros(2, VOCAB_SIZE)
    x = _ids("x")[0]
    logits[:, x] = 10.0  # both rows prefer "x"; only "y" or "n" may start the guided answer
    tokens, _ = pick(logits, guided, req())
    assert tokens[1] == x
    assert tokens[0] in (_ids("y")[0], _ids("n")[0])


def test_greedy_decoding_under_a_schema_yields_valid_json(grammar):
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
        "additionalProperties": False,
    }
    r = req(matcher=grammar.matcher(GuidedSpec(GuidedKind.JSON_SCHEMA, json.dumps(schema))))
    gen = torch.Generator().manual_seed(3)
    for _ in range(40):
        logits = torch.randn(1, VOCAB_SIZE, generator=gen)
        (tok,), _ = pick(logits, r)
        if tok == EOS:
            break
        r.output_ids.append(tok)
    else:
        pytest.fail("the grammar never allowed EOS")
    obj = json.loads(tiny_tokenizer().decode(r.output_ids))
    assert set(obj) == {"n"} and isinstance(obj["n"], int)


@pytest.mark.parametrize(
    "spec",
    [
        GuidedSpec(GuidedKind.REGEX, "(unclosed"),
        GuidedSpec(GuidedKind.JSON_SCHEMA, "{not json"),
        GuidedSpec(GuidedKind.JSON_SCHEMA, json.dumps({"type": 7})),
        GuidedSpec(GuidedKind.CHOICE, ()),
        GuidedSpec(GuidedKind.CHOICE, ("a", "")),
    ],
)
def test_invalid_grammars_are_invalid_argument(grammar, spec):
    from hotlora.adapters.errors import InvalidArgument

    with pytest.raises(InvalidArgument):
        grammar.matcher(spec)


def test_nothing_allowed_ends_the_row_instead_of_sampling_nan():
    logits = torch.full((1, 10), -math.inf)
    r = req(logit_bias=((1, 1.0),), temperature=1.0)  # a controlled row whose every logit is -inf
    assert pick(logits, r)[0] == [EOS]


def test_requests_with_the_same_schema_get_independent_matchers(grammar):
    spec = GuidedSpec(GuidedKind.CHOICE, ("yes", "no"))
    first, second = grammar.matcher(spec), grammar.matcher(spec)  # the second is a copy of the cached one
    assert first.accept(_ids("y")[0])
    assert second.accept(_ids("n")[0])  # not steered by the first request's "y"
    assert not first.accept(_ids("o")[0])  # "yo" is no choice
