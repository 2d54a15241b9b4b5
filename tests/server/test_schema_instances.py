"""JSON schemas with no finite value are refused before a request is queued (issue 37): a model could never
finish an answer that matches them, and llguidance compiles them without complaint. Recursive schemas that
do have finite values (trees, lists ending in null, optional recursion) stay accepted."""

from __future__ import annotations

import json

import pytest

from hotlora.adapters.errors import InvalidArgument
from hotlora.server.engine.guided import GuidedKind, GuidedSpec
from hotlora.server.engine.schema_instances import no_finite_instance


def obj(required: dict, **kw) -> dict:
    return {"type": "object", "properties": required, "required": list(required), **kw}


CYCLE = {  # the issue's a -> b -> a
    "$defs": {"a": obj({"b": {"$ref": "#/$defs/b"}}), "b": obj({"a": {"$ref": "#/$defs/a"}})},
    "$ref": "#/$defs/a",
}

NO_FINITE_VALUE = {
    "a -> b -> a": CYCLE,
    "itself": obj({"x": {"$ref": "#"}}),
    "at least one item of itself": {"type": "array", "items": {"$ref": "#"}, "minItems": 1},
    "a tuple of itself": {
        "type": "array",
        "prefixItems": [{"type": "integer"}, {"$ref": "#"}],
        "minItems": 2,
    },
    "every anyOf branch": {"anyOf": [obj({"x": {"$ref": "#"}}), {"allOf": [{"$ref": "#/anyOf/0"}]}]},
    "allOf itself": {"allOf": [{"$ref": "#"}]},
    "oneOf of recursive": {"oneOf": [obj({"x": {"$ref": "#"}}), obj({"y": {"$ref": "#"}})]},
    "through additionalProperties": {
        "type": "object",
        "required": ["z"],
        "additionalProperties": {"$ref": "#"},
    },
    "a false property": obj({"x": False}),
    "deep in $defs, with a ~/ name": {
        "$defs": {"x/y~": obj({"n": {"$ref": "#/$defs/x~1y~0"}})},
        "type": "object",
        "properties": {"top": {"$ref": "#/$defs/x~1y~0"}},
        "required": ["top"],
    },
}

FINITE = {
    "plain": obj({"answer": {"type": "string"}}),
    "optional recursion": {"type": "object", "properties": {"x": {"$ref": "#"}}},
    "a tree": obj({"value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#"}}}),
    "a list ending in null": {
        "$defs": {"node": obj({"next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}})},
        "$ref": "#/$defs/node",
    },
    "nullable": {"type": ["object", "null"], "properties": {"x": {"$ref": "#"}}, "required": ["x"]},
    "one finite branch": {"anyOf": [obj({"x": {"$ref": "#"}}), {"type": "string"}]},
    "an enum": {"enum": [{"x": 1}], **obj({"x": {"$ref": "#"}})},
    "no type given": {"properties": {"x": {"$ref": "#"}}, "required": ["x"]},  # a string is valid too
    "remote ref": obj({"x": {"$ref": "https://example.com/schema.json"}}),
}


@pytest.mark.parametrize("name", NO_FINITE_VALUE)
def test_schemas_with_no_finite_value_are_refused_naming_the_cycle(name):
    why = no_finite_instance(NO_FINITE_VALUE[name])
    assert why is not None and why.startswith("the JSON schema admits no finite value: '#'")
    with pytest.raises(InvalidArgument, match="admits no finite value"):
        GuidedSpec(GuidedKind.JSON_SCHEMA, json.dumps(NO_FINITE_VALUE[name])).grammar()


def test_the_message_walks_the_cycle():
    why = no_finite_instance(CYCLE)
    assert "'#/$defs/a' requires '#/$defs/a/properties/b' requires '#/$defs/b'" in why
    assert why.count("'#/$defs/a'") == 2  # where the cycle closes
    assert no_finite_instance(True) is None and no_finite_instance(False) is not None


@pytest.mark.parametrize("name", FINITE)
def test_recursive_schemas_with_finite_values_are_accepted(name):
    assert no_finite_instance(FINITE[name]) is None
    GuidedSpec(GuidedKind.JSON_SCHEMA, json.dumps(FINITE[name])).grammar()


def test_a_deep_schema_is_checked_without_recursion():
    schema: dict = {"type": "string"}
    for _ in range(5000):
        schema = obj({"x": schema})
    assert no_finite_instance(schema) is None
    schema["properties"]["x"] = {"$ref": "#"}
    assert no_finite_instance(schema) is not None
