"""Whether a JSON schema admits any finite JSON value, decided before a request is queued.

llguidance refuses schemas it can tell are unsatisfiable (an empty enum, minLength over maxLength,
incompatible types), but not one whose every value must contain itself: `a` requires a property of schema
`b` and `b` one of schema `a`. Such a schema compiles; its only instances are infinite, so a model can never
finish a valid answer, and llguidance's matcher gives up (ParserTooComplex) on the forced infinite prefix.

The question is the one asked of a context-free grammar's non-terminals (which are productive?), over the
schema's nodes: a node has a finite instance if every requirement its keywords impose can be met by a node
that has one. Requirements are conjunctions of alternatives:

- `$ref` (local JSON pointers), each `allOf` member: must hold;
- `anyOf`, `oneOf`: one member must hold;
- `type`: one of its types must hold; `object` requires each `required` property's schema (from
  `properties`, else `additionalProperties`); `array` requires its first `minItems` items' schemas
  (`prefixItems`, then `items`); other types require nothing;
- `false` can never hold.

Anything not understood (remote or anchor refs, keywords not listed) counts as satisfiable: a schema is
refused only when it provably has no finite instance. The least fixed point is found with a worklist
(linear in the schema's nodes); nothing recurses, so a deeply nested schema cannot exhaust the stack."""

from __future__ import annotations

from collections import deque
from urllib.parse import unquote

MAX_ITEMS_CHECKED = 64  # minItems beyond the prefix items all share one `items` schema


class _Graph:
    def __init__(self, root):
        self.root = root
        self.ids: dict[str, int] = {}  # JSON pointer -> node
        self.pointers: list[str] = []
        self.groups: list[list[list[int]]] = []  # node -> its requirements, each a list of alternatives
        self.todo: deque[tuple[int, object]] = deque()

    def node(self, pointer: str, schema) -> int:
        if pointer not in self.ids:
            self.ids[pointer] = len(self.pointers)
            self.pointers.append(pointer)
            self.groups.append([])
            self.todo.append((self.ids[pointer], schema))
        return self.ids[pointer]

    def aux(self, pointer: str, groups: list[list[int]]) -> int:
        """A node standing for a conjunction (one alternative of `type`)."""
        i = len(self.pointers)
        self.pointers.append(pointer)
        self.groups.append(groups)
        return i

    def build(self) -> None:
        self.node("#", self.root)
        while self.todo:
            i, schema = self.todo.popleft()
            self.groups[i] = self._requirements(self.pointers[i], schema)

    def _child(self, pointer: str, schema) -> int | None:
        return self.node(pointer, schema) if isinstance(schema, dict | bool) else None

    def _requirements(self, at: str, schema) -> list[list[int]]:
        if schema is False:
            return [[]]  # an alternative-free requirement: never met
        if not isinstance(schema, dict):
            return []
        groups: list[list[int]] = []
        ref = schema.get("$ref")
        if isinstance(ref, str):
            target = self._resolve(ref)
            if target is not None:
                groups.append([self.node(*target)])
        for i, member in enumerate(_list(schema.get("allOf"))):
            child = self._child(f"{at}/allOf/{i}", member)
            if child is not None:
                groups.append([child])
        for key in ("anyOf", "oneOf"):
            members = _list(schema.get(key))
            children = [self._child(f"{at}/{key}/{i}", m) for i, m in enumerate(members)]
            if members and None not in children:
                groups.append([c for c in children if c is not None])
        if "enum" in schema or "const" in schema:
            return groups  # a literal value: its type's requirements do not apply
        types = schema.get("type")
        if isinstance(types, str):
            types = [types]
        if isinstance(types, list) and types:
            alternatives = []
            for t in types:
                needs = self._type_requirements(at, schema, t)
                alternatives.append(self.aux(f"{at} as {t}", needs) if needs else None)
            if None not in alternatives:  # a type that needs nothing makes the whole `type` free
                groups.append([a for a in alternatives if a is not None])
        return groups

    def _type_requirements(self, at: str, schema: dict, t) -> list[list[int]]:
        needs: list[list[int]] = []
        if t == "object":
            props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
            for name in _list(schema.get("required")):
                if not isinstance(name, str):
                    continue
                if name in props:
                    child = self._child(f"{at}/properties/{_escape(name)}", props[name])
                elif not schema.get("patternProperties"):
                    extra = schema.get("additionalProperties", True)
                    child = self._child(f"{at}/additionalProperties", extra)
                else:
                    child = None  # which pattern applies is the grammar engine's business
                if child is not None:
                    needs.append([child])
        elif t == "array":
            prefix = schema.get("prefixItems")
            prefix_key = "prefixItems"
            items = schema.get("items", True)
            if isinstance(items, list):  # draft 4-7 tuples
                prefix, prefix_key, items = items, "items", schema.get("additionalItems", True)
            prefix = prefix if isinstance(prefix, list) else []
            least = schema.get("minItems", 0)
            least = least if isinstance(least, int) else 0
            for k in range(min(least, len(prefix) + 1, MAX_ITEMS_CHECKED)):
                if k < len(prefix):
                    child = self._child(f"{at}/{prefix_key}/{k}", prefix[k])
                else:
                    child = self._child(f"{at}/items", items)
                if child is not None:
                    needs.append([child])
        return needs

    def _resolve(self, ref: str) -> tuple[str, object] | None:
        """A local JSON pointer's (pointer, schema); None for anything else (left to the grammar engine)."""
        if ref == "#":
            return "#", self.root
        if not ref.startswith("#/"):
            return None
        node = self.root
        for part in ref[2:].split("/"):
            key = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and key in node:
                node = node[key]
            elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            else:
                return None
        return ref, node

    def productive(self) -> list[bool]:
        """Which nodes have a finite instance: the least fixed point, by counting met requirements."""
        n = len(self.pointers)
        unmet = [len(g) for g in self.groups]
        met_group: list[list[bool]] = [[False] * len(g) for g in self.groups]
        waiting: list[list[tuple[int, int]]] = [[] for _ in range(n)]  # child -> (node, requirement)
        for i, groups in enumerate(self.groups):
            for j, alternatives in enumerate(groups):
                for child in alternatives:
                    waiting[child].append((i, j))
        done = [False] * n
        queue = deque(i for i in range(n) if unmet[i] == 0)
        for i in queue:
            done[i] = True
        while queue:
            child = queue.popleft()
            for i, j in waiting[child]:
                if not met_group[i][j]:
                    met_group[i][j] = True
                    unmet[i] -= 1
                    if unmet[i] == 0 and not done[i]:
                        done[i] = True
                        queue.append(i)
        return done

    def cycle_from_root(self, done: list[bool]) -> list[str]:
        """Pointers along unmet requirements from the root until one repeats: what to name in the error."""
        path, seen, i = [], set(), 0
        while i not in seen:
            seen.add(i)
            path.append(self.pointers[i])
            unmet = [g for g in self.groups[i] if not any(done[c] for c in g)]
            if not unmet or not unmet[0]:
                break
            i = unmet[0][0]
        else:
            path.append(self.pointers[i])
        return [p for p in path if " as " not in p]


def no_finite_instance(schema) -> str | None:
    """Why `schema` admits no finite JSON value, or None when it may admit one."""
    graph = _Graph(schema)
    graph.build()
    done = graph.productive()
    if done[0]:
        return None
    path = graph.cycle_from_root(done)
    return (
        "the JSON schema admits no finite value: "
        + " requires ".join(f"'{p}'" for p in path)
        + " (required properties or items that contain themselves, or a schema that allows nothing)"
    )


def _list(value) -> list:
    return value if isinstance(value, list) else []


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")
