"""OpenAI request bodies -> the frontend's GenerateInput: the HTTP door's wire-to-domain conversion, as
conversion.py is the gRPC door's."""

from __future__ import annotations

import json

from hotlora.adapters.errors import InvalidArgument
from hotlora.server.engine.guided import GuidedKind, GuidedSpec
from hotlora.server.frontend.inference import GenerateInput


def split_model(model: str, base: str) -> tuple[str, str]:
    """A request's `model` -> (prefix, adapter reference): the served base name is ("", ""), vLLM's
    `base:adapter` is ("base:", "adapter"), anything else is ("", model)."""
    if model == base:
        return "", ""
    prefix = base + ":" if model.startswith(base + ":") else ""
    return prefix, model[len(prefix) :]


def generate_input(body, *, prompt="", messages=(), max_tokens, logprobs) -> GenerateInput:
    """A completions or chat completions body as the frontend's GenerateInput (the adapter set later)."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        bias = {int(k): float(v) for k, v in (body.logit_bias or {}).items()}
    except ValueError:
        raise InvalidArgument("logit_bias keys must be token ids (integers as strings)") from None
    return GenerateInput(
        prompt=prompt,
        messages=list(messages),
        max_new_tokens=max_tokens or 0,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),
        seed=body.seed,
        ignore_eos=body.ignore_eos,
        stop=stop,
        logprobs=logprobs,
        prompt_logprobs=body.prompt_logprobs,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty or 0.0,
        min_tokens=body.min_tokens,
        stop_token_ids=list(body.stop_token_ids or []),
        logit_bias=bias,
        guided=guided(body),
    )


def guided(body) -> GuidedSpec | None:
    """The one guided-decoding option of the body (OpenAI's response_format or vLLM's guided_*), if any."""
    specs = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        specs.append(GuidedSpec(GuidedKind.JSON_OBJECT))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise InvalidArgument("response_format json_schema needs json_schema.schema")
        specs.append(GuidedSpec(GuidedKind.JSON_SCHEMA, json.dumps(rf.json_schema.schema_)))
    if body.guided_json is not None:
        schema = body.guided_json if isinstance(body.guided_json, str) else json.dumps(body.guided_json)
        specs.append(GuidedSpec(GuidedKind.JSON_SCHEMA, schema))
    if body.guided_regex is not None:
        specs.append(GuidedSpec(GuidedKind.REGEX, body.guided_regex))
    if body.guided_choice is not None:
        specs.append(GuidedSpec(GuidedKind.CHOICE, tuple(body.guided_choice)))
    if len(specs) > 1:
        raise InvalidArgument("give one of response_format, guided_json, guided_regex, guided_choice")
    return specs[0] if specs else None
