"""Healing a pruned model: a short LoRA fine-tune (docs/method.md section 3.5).

After layers are removed, a small low-rank update of the remaining blocks recovers much of
what was lost (Gromov et al. 2024, Kim et al. 2024 "Shortened LLaMA"). `healed(...)` attaches
LoRA adapters (peft) to the linear layers of every block of a model, trains them for a fixed
budget and yields; on exit the adapters are removed again, so the model, which the worker
shares between jobs, is exactly as before (the same modules and bit-identical weights).

- Targets: per architecture (`ArchitectureAdapter.lora_modules`, e.g. for Llama
  `self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj`), the groups `attention`, `mlp` or
  `all`; a model of the generic fallback gets every `nn.Linear` / GPT-2 `Conv1D` of its blocks.
  Only the adapters train: every base weight keeps `requires_grad=False` while they are
  attached and is bit-identical (the test checks).
- Corpus: the texts are tokenized (the tokenizer's special tokens), joined (an EOS token
  between texts when the tokenizer does not end them with one) and cut into sequences of
  `max_tokens` tokens (`pack_tokens`). Texts that are also evaluated are left out first
  (`disjoint_texts`), so healing never trains on held-out text.
- Objective: the mean next-token cross-entropy over the sequence's tokens (`worker.lm.loss`).
  AdamW (no weight decay), constant learning rate, gradients clipped to norm 1, `steps`
  steps of `batch_size` sequences; an epoch is one pass in an order drawn from `seed`.
- Precision **(choice, as `worker.mitigation.contrastive`)**: the adapters are float32
  whatever the model's dtype (peft's `autocast_adapter_dtype`), so in a bfloat16 model the
  updates accumulate in float32 instead of rounding away; the base layers run in the model's
  dtype and the adapter's output is added in it.
- Determinism: the adapters' initialization, LoRA dropout and the batch order come from
  `seed` (under `torch.random.fork_rng`, so the process's random state is left as it was).
- Loss before / after: the mean token loss on a fixed sample of the corpus (its first
  `LOSS_SAMPLE` sequences), in eval mode, before the first and after the last step.
- Export (`merged_state_dict`, `export_healed_model`): each adapted weight W becomes
  W + scale x B A (peft's `get_delta_weight`, computed in float32), saved with
  `save_pretrained` in float32 by default (exact; rounding a bfloat16 model's merged weights
  back to bfloat16 would lose updates below the weight's spacing) or in the model's dtype.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from worker.lm.loss import token_nll
from worker.lm.model import is_causal_lm, model_device
from worker.lm.tokens import encode_texts, pad_batch, pad_id
from worker.modelzoo.adapters import ArchitectureAdapter, adapter_for
from worker.stage import JobContext, JobFailed

if TYPE_CHECKING:
    import transformers

    from app.schemas import HealOptions

__all__ = [
    "HealReport",
    "Healing",
    "disjoint_texts",
    "export_healed_model",
    "healed",
    "lora_targets",
    "pack_tokens",
]

ADAPTER = "heal"
LOSS_SAMPLE = 16  # sequences the loss before / after is measured on
HISTORY_POINTS = 100  # the training-loss curve is kept as at most this many window means
_MIN_OVERLAP_CHARS = 20  # a shorter text only counts as overlapping when equal


# ------------------------------------------------------------------- corpus


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def disjoint_texts(texts: Sequence[str], held_out: Sequence[str]) -> tuple[list[str], int]:
    """The texts that do not overlap any held-out text, and how many were left out.

    Overlap (after lower-casing and collapsing white space): equal, or one contains the other
    when the contained one has at least 20 characters."""
    held = [_norm(t) for t in held_out if t and t.strip()]
    held_set = set(held)
    long_held = [h for h in held_set if len(h) >= _MIN_OVERLAP_CHARS]
    kept: list[str] = []
    dropped = 0
    for text in texts:
        n = _norm(text)
        if not n:
            continue
        if n in held_set or any(h in n for h in long_held) or (
            len(n) >= _MIN_OVERLAP_CHARS and any(n in h for h in held_set)
        ):
            dropped += 1
            continue
        kept.append(text)
    return kept, dropped


def pack_tokens(tokenizer: Any, texts: Sequence[str], length: int) -> list[list[int]]:
    """The texts' tokens joined (EOS between texts unless a text ends with it) and cut into
    sequences of `length` tokens; a last shorter piece is kept when it has at least 2."""
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for ids in encode_texts(tokenizer, texts, None):
        if not ids:
            continue
        stream.extend(ids)
        if eos is not None and ids[-1] != eos:
            stream.append(int(eos))
    chunks = [stream[i : i + length] for i in range(0, len(stream), length)]
    return [c for c in chunks if len(c) >= 2]


# ------------------------------------------------------------------ targets


def lora_targets(model: torch.nn.Module, adapter: ArchitectureAdapter, targets: str = "all") -> list[str]:
    """Full module names of the linear layers adapted in every block of `model` (as it is now,
    e.g. inside a `pruned_view`): the adapter's `lora_modules` of the group(s) `targets`."""
    from transformers.pytorch_utils import Conv1D

    path = adapter.block_list_path(model)
    blocks = adapter.block_list(model)
    names: list[str] = []
    if not adapter.lora_modules:
        if targets != "all":
            raise JobFailed(
                "heal_unsupported",
                f"a {adapter.family} model has no known attention/MLP layout; use heal.targets = all",
            )
        for i, block in enumerate(blocks):
            names.extend(
                f"{path}.{i}.{n}" for n, m in block.named_modules() if n and isinstance(m, (torch.nn.Linear, Conv1D))
            )
    else:
        groups = list(adapter.lora_modules) if targets == "all" else [targets]
        rels = [rel for g in groups for rel in adapter.lora_modules.get(g, ())]
        for i, block in enumerate(blocks):
            for rel in dict.fromkeys(rels):
                try:
                    module = block.get_submodule(rel)
                except AttributeError:
                    continue  # e.g. a mixture-of-experts block without this projection
                if isinstance(module, (torch.nn.Linear, Conv1D)):
                    names.append(f"{path}.{i}.{rel}")
    if not names:
        raise JobFailed(
            "heal_unsupported", f"no linear layer to adapt in the blocks of this {adapter.family} model ({targets})"
        )
    return names


# --------------------------------------------------------------- training


@dataclass
class HealReport:
    steps: int
    epochs: float
    sequences: int
    tokens_per_sequence: int
    texts: int
    texts_left_out: int
    target_modules: int
    trainable_parameters: int
    rank: int
    alpha: int
    learning_rate: float
    seed: int
    adapter_dtype: str
    loss_before: float | None
    loss_after: float | None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class Healing:
    """The adapted model, while `healed` holds it: `model` runs with the adapters."""

    model: torch.nn.Module
    peft_model: Any
    report: HealReport

    def lora_layers(self) -> dict[str, Any]:
        """Module name (in `model`) -> peft LoRA layer."""
        from peft.tuners.lora import LoraLayer

        return {n: m for n, m in self.model.named_modules() if isinstance(m, LoraLayer)}

    def merged_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The model's state dict (on the CPU) with every adapted weight W replaced by
        W + scale x B A (in float32, then cast to `dtype`; default the model's dtype), under
        the names the model has without adapters; tensors shared in the model (tied
        embeddings) stay shared."""
        deltas: dict[str, torch.Tensor] = {}
        for name, layer in self.lora_layers().items():
            with torch.no_grad():
                deltas[f"{name}.weight"] = layer.get_delta_weight(ADAPTER).detach().float().cpu()
        out: dict[str, torch.Tensor] = {}
        seen: dict[int, torch.Tensor] = {}
        for key, tensor in self.model.state_dict().items():
            if ".lora_" in key or "lora_magnitude" in key:
                continue
            clean = key.replace(".base_layer.", ".")
            if clean in deltas:
                base = tensor.detach().cpu().float()
                out[clean] = (base + deltas[clean]).to(dtype or tensor.dtype)
                continue
            ident = id(tensor)
            if ident not in seen:
                t = tensor.detach().cpu()
                seen[ident] = t.to(dtype) if dtype is not None and t.is_floating_point() else t.clone()
            out[clean] = seen[ident]
        return out


def _chunks(order: Sequence[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(order), size):
        yield list(order[i : i + size])


def _batch(seqs: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = pad_batch(seqs, pad)
    return ids.to(device), mask.to(device)


def _mean_loss(model: torch.nn.Module, seqs: list[list[int]], pad: int, batch_size: int) -> float | None:
    total, count = 0.0, 0
    device = model_device(model)
    with torch.no_grad():
        for chunk in _chunks(range(len(seqs)), batch_size):
            ids, mask = _batch([seqs[i] for i in chunk], pad, device)
            nll = token_nll(model, ids, mask)
            total += float(nll.double().sum())
            count += int(mask[:, 1:].sum())
    if count == 0:
        return None
    value = total / count
    return value if math.isfinite(value) else None


def _history(losses: Sequence[float]) -> list[dict[str, float]]:
    """Window means of the per-step loss, at most HISTORY_POINTS of them."""
    if not losses:
        return []
    width = max(1, math.ceil(len(losses) / HISTORY_POINTS))
    out = []
    for start in range(0, len(losses), width):
        window = losses[start : start + width]
        out.append({"step": float(start + len(window)), "loss": float(np.mean(window))})
    return out


@contextlib.contextmanager
def _restored(model: torch.nn.Module) -> Iterator[None]:
    """Undo what attaching adapters changes besides the modules: requires_grad flags, the
    train/eval mode, the `peft_config` attribute peft sets, `config.pretraining_tp`."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    config = getattr(model, "config", None)
    tp = getattr(config, "pretraining_tp", None) if config is not None else None
    had_peft_config = "peft_config" in vars(model)
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            if name in flags:
                p.requires_grad_(flags[name])
            p.grad = None
        model.train(was_training)
        if config is not None and tp is not None:
            config.pretraining_tp = tp
        if not had_peft_config and "peft_config" in vars(model):
            delattr(model, "peft_config")


def _adapter_params(peft_model: Any) -> list[torch.nn.Parameter]:
    return [p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n]


@contextlib.contextmanager
def healed(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    options: HealOptions,
    *,
    adapter: ArchitectureAdapter | None = None,
    ctx: JobContext | None = None,
    progress_stage: str = "heal",
    seed: int = 0,
    texts_left_out: int = 0,
) -> Iterator[Healing]:
    """Attach LoRA adapters to `model` in place, train them on `texts` (see module doc) and
    yield the `Healing`; on exit (errors and cancellation included) the adapters are removed
    and the model is as before. `seed` is used when `options.seed` is unset."""
    from peft import LoraConfig, get_peft_model

    if not is_causal_lm(model):
        raise JobFailed("heal_unsupported", f"healing trains the LM loss; {type(model).__name__} is not a causal LM")
    ctx = ctx or JobContext()
    adapter = adapter or adapter_for(model)
    seed = options.seed if options.seed is not None else seed
    seqs = pack_tokens(tokenizer, texts, options.max_tokens)
    if not seqs:
        raise JobFailed("heal_no_data", "the healing corpus has no text left to train on (after leaving out "
                        f"{texts_left_out} texts that overlap the evaluated ones)")
    names = lora_targets(model, adapter, options.targets)
    alpha = int(options.alpha) if options.alpha is not None else 2 * options.rank
    config = LoraConfig(
        r=options.rank, lora_alpha=alpha, lora_dropout=options.dropout, target_modules=names, bias="none",
        fan_in_fan_out=False,
    )
    pad = pad_id(tokenizer)
    device = model_device(model)
    sample = seqs[:LOSS_SAMPLE]
    devices = [device.index if device.index is not None else 0] if device.type == "cuda" else []
    started = time.monotonic()
    peft_model: Any = None
    with _restored(model), torch.random.fork_rng(devices=devices):
        try:
            torch.manual_seed(seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "fan_in_fan_out is set to True" for GPT-2's Conv1D
                peft_model = get_peft_model(model, config, adapter_name=ADAPTER, autocast_adapter_dtype=True)
            params = _adapter_params(peft_model)
            model.eval()
            loss_before = _mean_loss(model, sample, pad, options.batch_size)
            optimizer = torch.optim.AdamW(params, lr=options.learning_rate, weight_decay=0.0)
            rng = np.random.default_rng(seed)
            order: list[int] = []
            losses: list[float] = []
            model.train()
            ctx.progress(progress_stage, 0, options.steps)
            for step in range(options.steps):
                ctx.check_cancelled()
                if len(order) < options.batch_size:
                    order.extend(rng.permutation(len(seqs)).tolist())
                batch, order = order[: options.batch_size], order[options.batch_size :]
                ids, mask = _batch([seqs[i] for i in batch], pad, device)
                with torch.enable_grad():
                    nll = token_nll(model, ids, mask)
                    loss = nll.sum() / mask[:, 1:].sum().clamp(min=1)
                    if not torch.isfinite(loss):
                        raise JobFailed(
                            "training_diverged",
                            f"the healing loss became {float(loss)} at step {step + 1}; lower heal.learning_rate",
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                losses.append(float(loss.detach()))
                ctx.progress(progress_stage, step + 1, options.steps)
            model.eval()
            loss_after = _mean_loss(model, sample, pad, options.batch_size)
            optimizer = None  # type: ignore[assignment]
            report = HealReport(
                steps=options.steps,
                epochs=options.steps * options.batch_size / len(seqs),
                sequences=len(seqs),
                tokens_per_sequence=options.max_tokens,
                texts=len(texts),
                texts_left_out=texts_left_out,
                target_modules=len(names),
                trainable_parameters=sum(p.numel() for p in params),
                rank=options.rank,
                alpha=alpha,
                learning_rate=options.learning_rate,
                seed=seed,
                adapter_dtype=str(params[0].dtype).removeprefix("torch.") if params else "",
                loss_before=loss_before,
                loss_after=loss_after,
                history=_history(losses),
                seconds=time.monotonic() - started,
            )
            yield Healing(model, peft_model, report)
        finally:
            if peft_model is not None:
                peft_model.unload()  # the original modules back in place, their weights untouched


# ------------------------------------------------------------------ export


def export_healed_model(
    healing: Healing, tokenizer: Any | None = None, *, dtype: str = "float32", card: Callable[[Path], Any] | None = None
) -> bytes:
    """The healed model with LoRA merged into its weights, `save_pretrained` (safetensors) and
    the tokenizer, as .tar.gz bytes (folder `healed-model`). `dtype`: `float32` or `model`.
    `card(folder)` writes the model card before packing (`worker.modelcard.write_model_card`)."""
    model = healing.model
    model_dtype = next(model.parameters()).dtype
    target = torch.float32 if dtype == "float32" else model_dtype
    state = healing.merged_state_dict(target if target != model_dtype else None)
    with tempfile.TemporaryDirectory(prefix="layerscope-healed-") as tmp:
        folder = Path(tmp) / "healed-model"
        saver = cast("transformers.PreTrainedModel", model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            saver.save_pretrained(str(folder), state_dict=state)
        if target != model_dtype:  # save_pretrained writes the dtype of the model's parameters
            path = folder / "config.json"
            config = json.loads(path.read_text())
            for key in ("dtype", "torch_dtype"):
                if key in config:
                    config[key] = "float32"
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
        if card is not None:
            card(folder)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
            tar.add(str(folder), arcname="healed-model")
        return buf.getvalue()
