"""Architecture adapters: where a model's transformer blocks are and what to hook in them.

Every family maps the canonical capture sites of docs/method.md section 1 to Hugging Face
module paths inside one block:

| site | meaning | how it is captured |
|---|---|---|
| `block_output` | the block's output hidden state, `[batch, pos, d_model]` | output of the block (first element if a tuple) |
| `mlp_activation` | the MLP's post-nonlinearity activation, `[batch, pos, d_ff]` | *input* of the MLP's down projection |
| `attention_output` | attention sub-block output before the residual add, `[batch, pos, d_model]` | output (first element) of the attention module |

Per family (paths relative to one block):

| family | blocks | `mlp_activation` (input of) | `attention_output` (output of) |
|---|---|---|---|
| llama (llama, mistral, qwen2, qwen3, phi3, olmo, granite, ...; SmolLM2 is llama) | `model.layers` | `mlp.down_proj` (act(gate) * up) | `self_attn` |
| gemma (gemma) | `model.layers` | `mlp.down_proj` | `self_attn` |
| gemma (gemma2, gemma3, gemma3_text) | `model.layers` / `model.language_model.layers` | `mlp.down_proj` | `post_attention_layernorm` (the sandwich norm after `self_attn`: what is added to the residual) |
| gpt2 (gpt2, gpt_bigcode) | `transformer.h` | `mlp.c_proj` | `attn` |
| gpt_neox | `gpt_neox.layers` | `mlp.dense_4h_to_h` | `attention` |
| opt | `model.decoder.layers` | `fc2` | `self_attn` |
| bert (bert, roberta, xlm-roberta, electra, camembert) | `encoder.layer` | `output.dense` (= intermediate output) | `attention.output.dense` (before dropout, residual add and LayerNorm) |
| distilbert | `transformer.layer` | `ffn.lin2` | `attention` |
| generic fallback | the largest `nn.ModuleList` of same-class children | - | - |

`lora_modules` names, per family, the linear layers of a block that LoRA healing adapts
(`worker.healing`), in two groups: `attention` (the q/k/v/output projections, or GPT-2's
`c_attn`/`c_proj`, GPT-NeoX's `query_key_value`/`dense`) and `mlp` (up/gate/down, `c_fc`/`c_proj`,
`fc1`/`fc2`, ...); the generic fallback adapts every `nn.Linear`/`Conv1D` of its blocks.

The generic fallback only provides `block_output`. A site whose module is missing in a
block (e.g. a mixture-of-experts MLP without a single `down_proj`) is left out of that
block's `sites`; callers must check the sites they need are there.

OPT runs its MLP on flattened tokens, so its `mlp_activation` arrives as
`[batch * pos, d_ff]`: `CaptureSite.flat_tokens` is True there. `CaptureSite.register`
hooks a site and hands the tensor to a callback; it is the one hook implementation (the
profiler's `worker.profiler.hooks.capture` registers through it too).

`ArchitectureAdapter.logit_lens` maps a block's output to next-token logits the way the
model maps its last block's output (for layer-contrast decoding, docs/method.md section
8): the final norm (a sibling of the block list named `norm`, `final_layer_norm`, `ln_f`,
`final_layernorm` or `norm_f`; none where the model has none, e.g. OPT-350m), OPT's
`project_out` when it has one, the output embeddings (`get_output_embeddings()`), and the
`final_logit_softcapping` of Gemma 2. Causal LMs only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from worker.lm.hooks import first_tensor, input_tensor
from worker.stage import JobFailed


@dataclass
class CaptureSite:
    """A module to hook: its output (forward hook; first element if a tuple), or with
    `use_input=True` its first positional input (forward pre-hook).

    `flat_tokens=True` says the tensor arrives as `[batch * pos, width]` (OPT runs its MLP
    on flattened tokens); view it as `[batch, pos, width]` (same order) before masking."""

    module: torch.nn.Module
    use_input: bool = False
    flat_tokens: bool = False

    def register(self, fn: Callable[[torch.Tensor], None]) -> torch.utils.hooks.RemovableHandle:
        """Hook the site: `fn` gets the captured tensor at every forward pass. Remove the
        returned handle (in a `finally`) when done.

        Output sites get `first_tensor(output)`. Input sites get `first_tensor(args[0])`
        when the module was called with positional arguments, else the keyword argument
        `hidden_states`, `input` or `x` (the first of these that is a tensor), else the
        first tensor among the keyword arguments. A forward pass where no tensor is found
        does not call `fn`. The hook never changes what the model computes."""
        if self.use_input:

            def pre_hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                tensor = input_tensor(args, kwargs)
                if tensor is not None:
                    fn(tensor)

            return self.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def hook(_module: torch.nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            tensor = first_tensor(output)
            if tensor is not None:
                fn(tensor)

        return self.module.register_forward_hook(hook)


@dataclass
class BlockInfo:
    index: int  # 0-based
    name: str  # module path, e.g. "model.layers.3"
    module: torch.nn.Module
    sites: dict[str, CaptureSite] = field(default_factory=dict)


@dataclass
class LogitLens:
    """A block output `[..., d_model]` to next-token logits `[..., vocab]` (float32), through
    the model's own final norm, projection, LM head and soft-capping (module doc)."""

    head: torch.nn.Module
    norm: torch.nn.Module | None = None
    projection: torch.nn.Module | None = None
    softcap: float | None = None
    norm_path: str | None = None  # where the final norm was found (None: the model has none)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden
        if self.norm is not None:
            x = self.norm(x)
        if self.projection is not None:
            x = self.projection(x)
        logits = self.head(x).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


@dataclass(frozen=True)
class SiteRule:
    """Where a site lives, relative to a block: `path` "" is the block itself."""

    path: str
    use_input: bool = False
    flat_tokens: bool = False


def _get_submodule(root: torch.nn.Module, path: str) -> torch.nn.Module | None:
    if not path:
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _module_lists(model: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and n]


def _model_type(model: torch.nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) if config is not None else None


class ArchitectureAdapter:
    """Base adapter: a family is a list of `model_type`s, the dotted suffixes where its
    block list lives (tried in order, shortest match wins) and its site rules."""

    family: str = "base"
    model_types: tuple[str, ...] = ()
    block_list_suffixes: tuple[str, ...] = ()
    site_rules: dict[str, SiteRule] = {"block_output": SiteRule("")}
    final_norm_names: tuple[str, ...] = ("norm", "final_layer_norm", "ln_f", "final_layernorm", "norm_f")
    projection_names: tuple[str, ...] = ("project_out",)
    # The linear layers of one block that LoRA healing adapts (`worker.healing`), per group,
    # relative to the block; empty: every nn.Linear / Conv1D in the block, as one group "all".
    lora_modules: dict[str, tuple[str, ...]] = {}

    # ---------------------------------------------------------------- logit lens

    def logit_lens(self, model: torch.nn.Module) -> LogitLens:
        """How the model turns its last block's output into logits (module doc); JobFailed
        `model_unsupported` for a model without output embeddings."""
        getter = getattr(model, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        if not isinstance(head, torch.nn.Module):
            raise JobFailed(
                "model_unsupported",
                f"{type(model).__name__} has no LM head (output embeddings), so its layers cannot be read as "
                "next-token distributions",
            )
        path = self.block_list_path(model)
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        norm_path, norm = None, None
        for name in self.final_norm_names:
            found = _get_submodule(model, f"{parent}.{name}" if parent else name)
            if found is not None:
                norm_path, norm = (f"{parent}.{name}" if parent else name), found
                break
        projection = None
        for name in self.projection_names:
            found = _get_submodule(model, f"{parent}.{name}" if parent else name)
            if found is not None:
                projection = found
                break
        config = getattr(model, "config", None)
        config = getattr(config, "text_config", None) or config
        softcap = getattr(config, "final_logit_softcapping", None)
        return LogitLens(head=head, norm=norm, projection=projection,
                         softcap=float(softcap) if softcap else None, norm_path=norm_path)

    # ---------------------------------------------------------------- blocks

    def find_block_list_path(self, model: torch.nn.Module) -> str | None:
        lists = _module_lists(model)
        for suffix in self.block_list_suffixes:
            hits = [n for n, m in lists if len(m) > 0 and (n == suffix or n.endswith("." + suffix))]
            if hits:
                return min(hits, key=lambda n: (n.count("."), n))
        return None

    def block_list_path(self, model: torch.nn.Module) -> str:
        path = self.find_block_list_path(model)
        if path is None:
            raise JobFailed(
                "unsupported_architecture",
                f"could not find the transformer blocks of {type(model).__name__} as a {self.family} model "
                f"(looked for an nn.ModuleList at {', '.join(self.block_list_suffixes)})",
            )
        return path

    def block_list(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """The `nn.ModuleList` of the blocks (at `block_list_path`)."""
        return cast(torch.nn.ModuleList, model.get_submodule(self.block_list_path(model)))

    def rules_for(self, block: torch.nn.Module) -> dict[str, SiteRule]:
        return dict(self.site_rules)

    def blocks(self, model: torch.nn.Module) -> list[BlockInfo]:
        path = self.block_list_path(model)
        block_list = cast(torch.nn.ModuleList, model.get_submodule(path))  # found as a ModuleList
        out: list[BlockInfo] = []
        for i, block in enumerate(block_list):
            sites: dict[str, CaptureSite] = {}
            for site, rule in self.rules_for(block).items():
                module = _get_submodule(block, rule.path)
                if module is not None:
                    sites[site] = CaptureSite(
                        module=module, use_input=rule.use_input, flat_tokens=rule.flat_tokens
                    )
            out.append(BlockInfo(index=i, name=f"{path}.{i}", module=block, sites=sites))
        return out

    def matches_structure(self, model: torch.nn.Module) -> bool:
        """True when the block list is found and block 0 has every site module."""
        path = self.find_block_list_path(model)
        if path is None:
            return False
        first = cast(torch.nn.ModuleList, model.get_submodule(path))[0]
        return all(_get_submodule(first, r.path) is not None for r in self.rules_for(first).values())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} family={self.family!r}>"


class LlamaAdapter(ArchitectureAdapter):
    family = "llama"
    model_types = (
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen3",
        "phi3",
        "olmo",
        "olmo2",
        "granite",
        "smollm3",
        "stablelm",
    )
    block_list_suffixes = ("model.layers", "language_model.layers", "layers")
    site_rules = {
        "block_output": SiteRule(""),
        "mlp_activation": SiteRule("mlp.down_proj", use_input=True),
        "attention_output": SiteRule("self_attn"),
    }
    lora_modules = {
        "attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
        "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    }


class GemmaAdapter(ArchitectureAdapter):
    family = "gemma"
    model_types = ("gemma", "gemma2", "gemma3", "gemma3_text")
    block_list_suffixes = ("language_model.layers", "model.layers", "layers")
    site_rules = LlamaAdapter.site_rules
    lora_modules = LlamaAdapter.lora_modules

    def rules_for(self, block: torch.nn.Module) -> dict[str, SiteRule]:
        rules = dict(self.site_rules)
        # Gemma 2/3 normalise the attention output (sandwich norm) before the residual add;
        # Gemma 1's post_attention_layernorm is the pre-MLP norm, so keep self_attn there.
        if hasattr(block, "pre_feedforward_layernorm") and hasattr(block, "post_attention_layernorm"):
            rules["attention_output"] = SiteRule("post_attention_layernorm")
        return rules


class GPT2Adapter(ArchitectureAdapter):
    family = "gpt2"
    model_types = ("gpt2", "gpt_bigcode")
    block_list_suffixes = ("transformer.h", "h")
    site_rules = {
        "block_output": SiteRule(""),
        "mlp_activation": SiteRule("mlp.c_proj", use_input=True),
        "attention_output": SiteRule("attn"),
    }
    lora_modules = {"attention": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")}


class GPTNeoXAdapter(ArchitectureAdapter):
    family = "gpt_neox"
    model_types = ("gpt_neox",)
    block_list_suffixes = ("gpt_neox.layers", "layers")
    site_rules = {
        "block_output": SiteRule(""),
        "mlp_activation": SiteRule("mlp.dense_4h_to_h", use_input=True),
        "attention_output": SiteRule("attention"),
    }
    lora_modules = {
        "attention": ("attention.query_key_value", "attention.dense"),
        "mlp": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    }


class OPTAdapter(ArchitectureAdapter):
    family = "opt"
    model_types = ("opt",)
    block_list_suffixes = ("decoder.layers",)
    site_rules = {
        "block_output": SiteRule(""),
        "mlp_activation": SiteRule("fc2", use_input=True, flat_tokens=True),
        "attention_output": SiteRule("self_attn"),
    }
    lora_modules = {
        "attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
        "mlp": ("fc1", "fc2"),
    }


class BertAdapter(ArchitectureAdapter):
    family = "bert"
    model_types = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
    block_list_suffixes = ("encoder.layer",)
    site_rules = {
        "block_output": SiteRule(""),
        "mlp_activation": SiteRule("output.dense", use_input=True),
        "attention_output": SiteRule("attention.output.dense"),
    }
    lora_modules = {
        "attention": (
            "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        ),
        "mlp": ("intermediate.dense", "output.dense"),
    }


class DistilBertAdapter(ArchitectureAdapter):
    family = "distilbert"
    model_types = ("distilbert",)
    block_list_suffixes = ("transformer.layer",)
    site_rules = {
        "block_output": SiteRule(""),
        "mlp_activation": SiteRule("ffn.lin2", use_input=True),
        "attention_output": SiteRule("attention"),
    }
    lora_modules = {
        "attention": ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin"),
        "mlp": ("ffn.lin1", "ffn.lin2"),
    }


class GenericAdapter(ArchitectureAdapter):
    """Fallback: the largest nn.ModuleList whose children are all the same class.
    Only `block_output` is provided."""

    family = "generic"
    site_rules = {"block_output": SiteRule("")}

    def find_block_list_path(self, model: torch.nn.Module) -> str | None:
        best: tuple[int, int, str] | None = None
        for name, ml in _module_lists(model):
            children = list(ml)
            if not children or len({type(c) for c in children}) != 1:
                continue
            # Prefer more blocks, then the shallowest path.
            key = (-len(children), name.count("."), name)
            if best is None or key < best:
                best = key
        return best[2] if best else None

    def block_list_path(self, model: torch.nn.Module) -> str:
        path = self.find_block_list_path(model)
        if path is None:
            raise _unsupported(model)
        return path


FAMILY_ADAPTERS: tuple[ArchitectureAdapter, ...] = (
    LlamaAdapter(),
    GemmaAdapter(),
    GPT2Adapter(),
    GPTNeoXAdapter(),
    OPTAdapter(),
    BertAdapter(),
    DistilBertAdapter(),
)
GENERIC_ADAPTER = GenericAdapter()
FAMILIES = tuple(a.family for a in FAMILY_ADAPTERS) + (GENERIC_ADAPTER.family,)


def _unsupported(model: torch.nn.Module) -> JobFailed:
    mt = _model_type(model)
    return JobFailed(
        "unsupported_architecture",
        f"cannot find the transformer blocks of {type(model).__name__}"
        + (f" (model_type {mt!r})" if mt else "")
        + ": it has no nn.ModuleList of same-class blocks. Supported families: "
        + ", ".join(a.family for a in FAMILY_ADAPTERS)
        + ", and any model whose blocks sit in one nn.ModuleList.",
    )


def adapter_for(model: torch.nn.Module) -> ArchitectureAdapter:
    """The adapter for `model`: by `config.model_type`, then by structure (block list and
    site modules where a known family keeps them), then the generic fallback."""
    mt = _model_type(model)
    if mt is not None:
        for adapter in FAMILY_ADAPTERS:
            if mt in adapter.model_types and adapter.find_block_list_path(model) is not None:
                return adapter
    for adapter in FAMILY_ADAPTERS:
        if adapter.matches_structure(model):
            return adapter
    if GENERIC_ADAPTER.find_block_list_path(model) is not None:
        return GENERIC_ADAPTER
    raise _unsupported(model)
