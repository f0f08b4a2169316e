"""What every layer scorer is and shares: the `Scorer` declaration, the `ScoreTable` it
returns, and the plumbing of a batched pass over the scoring texts.

A `ScoreTable` holds one `score` per block, **higher = more important**, so rankings
from different scorers compare directly. `ScoreTable.order()` is the ranking (least
important first, ties by the lower layer index, as the avss stage),
`ScoreTable.layer_rows()` the `LayerRow`s (`score`, `rank` with 1 = lowest score =
first pruning candidate as in the avss stage's table, and scorer-specific extras).

Every scorer hooks the adapter's blocks (`worker.lm.hooks.block_hooks`; removed in
`finally`), runs batched over the scoring texts (truncated to `max_tokens`, padded on
the right, through `AutoBatch`: an out-of-memory halves the batch), counts only real
tokens (attention mask), reports progress and checks cancellation per batch. "Block
input" is the hidden state a block receives, "block output" the one it returns (first
element of a tuple output).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np
import torch

from app.layervalues import LayerValue
from worker.lm.model import is_causal_lm, model_device
from worker.lm.tokens import encode_texts, pad_batch, pad_id
from worker.modelzoo import adapter_for
from worker.modelzoo.adapters import ArchitectureAdapter, BlockInfo
from worker.scoring.agreement import pruning_order, ranks_from_order
from worker.stage import JobContext, JobFailed, LayerRow, finite_or_none

if TYPE_CHECKING:
    import transformers

    from app.schemas import PruneOptions


@dataclass
class ScoreTable:
    """Per-layer scores of one scorer (higher = more important)."""

    scorer: str
    scores: list[float]
    block_names: list[str]
    extra: dict[str, list[float]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def order(self) -> list[int]:
        """The ranking: layer indices least important first (first pruning candidate first)."""
        return pruning_order(self.scores)

    def ranks(self) -> list[int]:
        return ranks_from_order(self.order())

    def layer_rows(self) -> list[LayerRow]:
        ranks = self.ranks()
        rows = []
        for i, score in enumerate(self.scores):
            values: dict[str, LayerValue] = {"score": finite_or_none(score), "rank": int(ranks[i])}
            for key, col in self.extra.items():
                values[key] = finite_or_none(col[i])
            rows.append(LayerRow(layer=i, block_name=self.block_names[i], scorer=self.scorer, values=values))
        return rows


class Scorer:
    """A layer scorer, declared as a class (as the architecture adapters are): what it
    needs, how the prune stage sizes its batches and passes its options, and `score`."""

    name: ClassVar[str]
    description: ClassVar[str]
    needs_causal_lm: ClassVar[bool] = False  # its objective is the causal LM loss
    needs_gradients: ClassVar[bool] = False  # a backward pass per batch: half the batch size
    from_stage: ClassVar[str | None] = None  # the ranking comes from this earlier stage, not `score`

    def batch_size(self, requested: int) -> int:
        """The batch size the prune stage runs this scorer with."""
        return max(1, requested // 2) if self.needs_gradients else requested

    def options(self, prune: PruneOptions) -> dict[str, Any]:
        """This scorer's keyword options, read from the prune options."""
        return {}

    def score(self, model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], **kw: Any) -> ScoreTable:
        raise NotImplementedError(f"scorer {self.name!r} takes its ranking from the {self.from_stage} stage")


def score_table(scorer: str, raw: np.ndarray, blocks: Sequence[BlockInfo], **kw: Any) -> ScoreTable:
    """The table of `raw` scores; a non-finite score is ranked least important, with a warning."""
    scores = np.asarray(raw, dtype=np.float64)
    warnings = list(kw.pop("warnings", []))
    bad = ~np.isfinite(scores)
    if bad.any():
        warnings.append(
            f"{scorer}: layers {np.flatnonzero(bad).tolist()} gave a non-finite score; ranked as least important"
        )
        floor = scores[~bad].min() - 1.0 if (~bad).any() else 0.0
        scores = np.where(bad, floor, scores)
    return ScoreTable(
        scorer=scorer, scores=scores.tolist(), block_names=[b.name for b in blocks], warnings=warnings, **kw
    )


# ------------------------------------------------------------------ plumbing


@dataclass
class Batch:
    ids: torch.Tensor
    mask: torch.Tensor
    rows: list[int]


@dataclass
class ScoringTexts:
    """The scoring texts, tokenized once, longest first; `batch(rows)` pads rows onto the device."""

    encoded: list[list[int]]
    order: list[int]
    pad: int
    device: torch.device

    def batch(self, rows: Sequence[int]) -> Batch:
        ids, mask = pad_batch([self.encoded[i] for i in rows], self.pad)
        return Batch(ids.to(self.device), mask.to(self.device), list(rows))


def scoring_texts(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], max_tokens: int | None) -> ScoringTexts:
    encoded = encode_texts(tokenizer, texts, max_tokens)
    keep = [i for i, e in enumerate(encoded) if len(e) > 0]
    if not keep:
        raise JobFailed("dataset_invalid", "no text to score layers on (every example is empty)")
    order = sorted(keep, key=lambda i: (-len(encoded[i]), i))
    return ScoringTexts(encoded, order, pad_id(tokenizer), model_device(model))


def setup(
    model: torch.nn.Module, adapter: ArchitectureAdapter | None, ctx: JobContext | None
) -> tuple[list[BlockInfo], JobContext]:
    adapter = adapter if adapter is not None else adapter_for(model)
    return adapter.blocks(model), (ctx if ctx is not None else JobContext())


def require_causal(model: torch.nn.Module, scorer: str) -> None:
    if not is_causal_lm(model):
        raise JobFailed(
            "scorer_unsupported",
            f"scorer {scorer!r} uses the causal LM loss as its task loss; {type(model).__name__} is not a causal "
            "LM. Use block_influence or angular_distance for encoders.",
        )


@contextmanager
def frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """No parameter requires grad while a gradient scorer runs (restored after): the gradients
    wanted are w.r.t. activations only, and a parameter that requires grad makes autograd keep
    every linear layer's input for a weight gradient nobody reads."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def embeddings_require_grad(model: torch.nn.Module) -> Iterator[None]:
    """Make the input embeddings a graph leaf when the parameters do not require grad, so
    block outputs are always differentiable (the model's parameters are left untouched)."""
    emb = cast("transformers.PreTrainedModel", model).get_input_embeddings()

    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        if isinstance(output, torch.Tensor) and not output.requires_grad:
            return output.detach().requires_grad_(True)
        return None

    handle = emb.register_forward_hook(hook) if emb is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def random_scores(n_layers: int, seed: int, block_names: Sequence[str] | None = None) -> ScoreTable:
    """A random ranking (the prune stage's random-layer baseline): scores are a seeded random
    permutation of 0..L-1."""
    rng = np.random.default_rng(seed)
    scores = rng.permutation(n_layers).astype(np.float64)
    names = list(block_names) if block_names is not None else [str(i) for i in range(n_layers)]
    return ScoreTable(scorer="random", scores=scores.tolist(), block_names=names, details={"seed": seed})
