"""What adapter validation needs to know about the resident base model, taken once from the live model.

Adapter parsing runs against this small value instead of the model itself, so it can be tested and run on
a thread without touching the model's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from hotlora.adapters.errors import FailedPrecondition


@dataclass(frozen=True)
class BaseModelInfo:
    model_type: str
    """`config.model_type`, e.g. "llama"."""
    num_layers: int
    hidden_size: int
    linear_shapes: dict[str, tuple[int, int]]
    """Short target name ("q_proj", "gate_proj", ...) -> (in_features, out_features) of the nn.Linear
    modules inside each decoder layer."""
    head_name: str = "score"
    """The `modules_to_save` name of the SEQ_CLS head in this family (`*ForSequenceClassification.score`)."""
    linear_paths: dict[str, str] = field(default_factory=dict)
    """Short name -> path inside a decoder layer ("q_proj" -> "self_attn.q_proj"); default: the short name."""
    layer_prefix: str = "model.layers"
    """Module path of the decoder layer list, as PEFT keys see it (relative to the *ForCausalLM)."""
    layer_submodules: tuple[str, ...] = ()
    """Every other submodule path inside a decoder layer (norms, `self_attn`, `mlp.act_fn`, ...)."""
    outer_modules: tuple[str, ...] = ()
    """Module paths outside the decoder layers (`model.embed_tokens`, `lm_head`, ...)."""
    lm_head_name: str = "lm_head"

    def __post_init__(self) -> None:
        paths = {short: short for short in self.linear_shapes} | dict(self.linear_paths)
        object.__setattr__(self, "linear_paths", paths)

    @classmethod
    def from_model(cls, model: nn.Module) -> BaseModelInfo:
        """Read the shapes from a transformers `*ForCausalLM` (Llama, Mistral, Qwen2 families)."""
        config = model.config
        layers = _find_layers(model)
        if layers is None:
            raise FailedPrecondition(
                f"cannot find the decoder layers of this {type(model).__name__}: expected `model.layers` "
                "(Llama, Mistral, Qwen2 families)"
            )
        layer_prefix, layer_list = layers
        layer0 = layer_list[0]
        shapes: dict[str, tuple[int, int]] = {}
        paths: dict[str, str] = {}
        others: list[str] = []
        for path, module in layer0.named_modules():
            if not path:
                continue
            if isinstance(module, nn.Linear):
                short = path.rsplit(".", 1)[-1]
                if short in shapes:
                    # Short names are our slot-bank keys; two linears with one name would collide.
                    raise FailedPrecondition(
                        f"decoder layer has two linear layers named {short!r} ({paths[short]}, {path})"
                    )
                shapes[short] = (module.in_features, module.out_features)
                paths[short] = path
            else:
                others.append(path)
        outer = tuple(
            name
            for name, _ in model.named_modules()
            if name and name != layer_prefix and not name.startswith(layer_prefix + ".")
        )
        lm_head = _name_of(model, model.get_output_embeddings()) or "lm_head"
        return cls(
            model_type=str(config.model_type),
            num_layers=len(layer_list),
            hidden_size=int(config.hidden_size),
            linear_shapes=shapes,
            linear_paths=paths,
            layer_prefix=layer_prefix,
            layer_submodules=tuple(others),
            outer_modules=outer,
            lm_head_name=lm_head,
        )

    def module_key(self, layer: int, short: str) -> str:
        """PEFT's key for a target module, e.g. `model.layers.0.self_attn.q_proj`."""
        return f"{self.layer_prefix}.{layer}.{self.linear_paths[short]}"

    def module_names(self, task: str) -> list[str]:
        """All module names PEFT would walk for `task` (the SEQ_CLS model has `score` for `lm_head`)."""
        names = []
        for name in self.outer_modules:
            if name == self.lm_head_name and task == "SEQ_CLS":
                name = self.head_name
            names.append(name)
        for i in range(self.num_layers):
            names.append(f"{self.layer_prefix}.{i}")
            names += [f"{self.layer_prefix}.{i}.{p}" for p in self.layer_submodules]
            names += [self.module_key(i, s) for s in self.linear_shapes]
        return names


def _find_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) > 0:
        return "model.layers", layers
    return None


def _name_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, module in model.named_modules():
        if module is target:
            return name
    return None
