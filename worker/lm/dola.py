"""Layer-contrast decoding (DoLa, Chuang et al. 2024; docs/method.md section 8): the next
token is chosen by how much the final layer's distribution gains over an earlier
("premature") layer's, among the tokens the final layer finds plausible.

At every step, for the last position of each row:

- `q_N = softmax(logits)`: the model's own next-token distribution (its last block, final
  norm, LM head). `q_j = softmax(lens(h_j))`: the distribution read from block `j`'s output
  `h_j` through the same final norm, projection, LM head and soft-capping
  (`ArchitectureAdapter.logit_lens`) **(choice: the final norm is applied to the premature
  hidden state, as for the last block. The DoLa reference code and transformers' `dola_layers`
  apply the LM head to the un-normalised residual stream; with RMSNorm models whose residual
  norm grows with depth (SmolLM2's massive activations) that reads an early layer at an
  arbitrary temperature)**. Block `N - 1` (the last) is the model's own distribution itself,
  so `q_{N-1} = q_N` exactly.
- Plausible set (adaptive plausibility constraint): `V_head = {x : q_N(x) >= alpha *
  max_w q_N(w)}`, `alpha = 0.1` by default (`alpha = 0` keeps every token).
- Premature layer: the one layer given (static DoLa), or per row and step the candidate with
  the largest Jensen-Shannon divergence `JSD(q_N || q_j) = KL(q_N || m)/2 + KL(q_j || m)/2`,
  `m = (q_N + q_j)/2` (dynamic DoLa; the paper's definition: the reference code sums the
  KL terms the other way round, `KL(m || .)`, and picks one layer for the whole batch; here
  each row picks its own, so an answer does not depend on its batch).
- Score: `F(x) = log q_N(x) - log q_j(x)` for `x` in `V_head`, `-inf` outside. With a
  repetition penalty `theta > 1` (DoLa uses 1.2 for open-ended text; off by default), as
  transformers' `repetition_penalty` does on these scores: for every token already in the
  row's prompt or answer, `F / theta` where `F > 0`, `F * theta` where `F < 0`.
- Greedy: the token with the largest `F`; among tokens with equal `F`, the one the final
  layer ranks first (then the lowest id, as `argmax`). **This tie-break is what makes
  DoLa with the premature layer equal to the final layer reproduce greedy decoding
  exactly**: then `F = 0` on all of `V_head`, every plausible token ties, and the final
  layer's argmax (always in `V_head`) is chosen; the repetition penalty leaves `0` at `0`.
  Sampled at temperature `T`: from `softmax(F / T)` (zero outside `V_head`).

The answer tokens' recorded log-probabilities stay the final layer's (`log q_N`, the model
at temperature 1), so the sequence-likelihood detector reads the same quantity with and
without DoLa. `decoding_of(model)` is the setting `generate` uses when it is given none: a
DoLa recipe patch installs it at load (`set_decoding`), a mitigation evaluation sets and
clears it around its run.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from worker.stage import JobFailed

if TYPE_CHECKING:
    from worker.modelzoo.adapters import ArchitectureAdapter, LogitLens

__all__ = [
    "DolaSpec",
    "DolaState",
    "Dola",
    "choose_greedy",
    "clear_decoding",
    "contrast_scores",
    "decoding_of",
    "js_divergence",
    "plausible_mask",
    "repetition_penalty",
    "set_decoding",
]


@dataclass(frozen=True)
class DolaSpec:
    """A DoLa decoding setting: `layers` the premature candidates (0-based block indices; one:
    static, several: dynamic selection by the largest JSD), `alpha` the plausibility
    constraint, `repetition_penalty` theta (1: off)."""

    layers: tuple[int, ...]
    alpha: float = 0.1
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("DoLa needs at least one premature layer")
        if len(set(self.layers)) != len(self.layers) or any(int(i) < 0 for i in self.layers):
            raise ValueError(f"DoLa premature layers must be distinct block indices >= 0, got {list(self.layers)}")
        if not (0.0 <= self.alpha <= 1.0):
            raise ValueError(f"DoLa alpha must lie in [0, 1], got {self.alpha}")
        if not (1.0 <= self.repetition_penalty <= 10.0) or not math.isfinite(self.repetition_penalty):
            raise ValueError(f"DoLa repetition_penalty must lie in [1, 10], got {self.repetition_penalty}")

    @property
    def dynamic(self) -> bool:
        return len(self.layers) > 1

    def to_dict(self) -> dict[str, Any]:
        return {"method": "dola", "layers": [int(i) for i in self.layers], "alpha": self.alpha,
                "repetition_penalty": self.repetition_penalty,
                "selection": "dynamic" if self.dynamic else "static"}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DolaSpec:
        """From `to_dict`'s form; ValueError when it is not one."""
        try:
            return cls(layers=tuple(int(i) for i in d["layers"]), alpha=float(d.get("alpha", 0.1)),
                       repetition_penalty=float(d.get("repetition_penalty", 1.0)))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a DoLa setting: {exc}") from exc


# ------------------------------------------------------------------ the setting of a model

_SETTINGS: weakref.WeakKeyDictionary[torch.nn.Module, DolaSpec] = weakref.WeakKeyDictionary()


def set_decoding(model: torch.nn.Module, spec: DolaSpec) -> None:
    """Make `generate` decode `model` with `spec` when it is given no setting of its own."""
    _SETTINGS[model] = spec


def clear_decoding(model: torch.nn.Module) -> None:
    _SETTINGS.pop(model, None)


def decoding_of(model: torch.nn.Module) -> DolaSpec | None:
    return _SETTINGS.get(model)


# ------------------------------------------------------------------ the arithmetic (module doc)


def plausible_mask(final_logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """`V_head`: True where `q_N(x) >= alpha * max q_N` (log space; `alpha = 0`: everywhere)."""
    if alpha <= 0.0:
        return torch.ones_like(final_logp, dtype=torch.bool)
    top = final_logp.max(dim=-1, keepdim=True).values
    return final_logp >= top + math.log(alpha)


def js_divergence(final_logp: torch.Tensor, premature_logp: torch.Tensor) -> torch.Tensor:
    """`JSD(q_N || q_j)` in nats over the last axis; `premature_logp` may carry leading axes
    (`[k, batch, vocab]` against `[batch, vocab]` gives `[k, batch]`)."""
    lp = final_logp.expand_as(premature_logp)
    lq = premature_logp
    lm = torch.logaddexp(lp, lq) - math.log(2.0)

    def kl(la: torch.Tensor) -> torch.Tensor:
        pa = la.exp()
        return torch.where(pa > 0, pa * (la - lm), torch.zeros_like(pa)).sum(dim=-1)

    return 0.5 * kl(lp) + 0.5 * kl(lq)


def contrast_scores(final_logp: torch.Tensor, premature_logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """`F = log q_N - log q_j` on `V_head`, `-inf` elsewhere."""
    return torch.where(plausible_mask(final_logp, alpha), final_logp - premature_logp,
                       torch.full_like(final_logp, -math.inf))


def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, theta: float) -> torch.Tensor:
    """Scores of the `seen` tokens divided by `theta` where positive, multiplied where negative."""
    if theta == 1.0:
        return scores
    penalised = torch.where(scores > 0, scores / theta, scores * theta)
    return torch.where(seen, penalised, scores)


def choose_greedy(scores: torch.Tensor, final_logits: torch.Tensor) -> torch.Tensor:
    """The largest score per row; ties go to the final layer's larger logit (module doc)."""
    best = scores.max(dim=-1, keepdim=True).values
    tied = scores == best
    return torch.argmax(final_logits.masked_fill(~tied, -math.inf), dim=-1)


# ------------------------------------------------------------------ decoding a model


@dataclass
class DolaState:
    """One batch's DoLa state: the tokens each row has seen (for the repetition penalty; built
    at the first step, when the vocabulary size is known) and per row how often each premature
    layer was chosen."""

    prompts: list[list[int]] | None  # per row its prompt's token ids; None without a penalty
    seen: torch.Tensor | None = None  # [active rows, vocab] bool
    counts: list[dict[int, int]] = field(default_factory=list)  # per batch row
    active: list[int] = field(default_factory=list)  # the batch rows still generating

    def seen_mask(self, vocab: int, device: torch.device) -> torch.Tensor | None:
        if self.prompts is not None and self.seen is None:
            self.seen = torch.zeros((len(self.prompts), vocab), dtype=torch.bool, device=device)
            for r, ids in enumerate(self.prompts):
                kept = [t for t in ids if 0 <= t < vocab]
                if kept:
                    self.seen[r, torch.tensor(kept, dtype=torch.long, device=device)] = True
        return self.seen

    def keep(self, idx: torch.Tensor) -> None:
        """Only the rows `idx` (positions among the active rows) go on."""
        self.active = [self.active[i] for i in idx.cpu().tolist()]
        if self.seen is not None:
            self.seen = self.seen[idx.to(self.seen.device)]
        elif self.prompts is not None:
            self.prompts = [self.prompts[i] for i in idx.cpu().tolist()]

    def add(self, tokens: torch.Tensor) -> None:
        if self.seen is not None:
            rows = torch.arange(tokens.shape[0], device=self.seen.device)
            t = tokens.to(self.seen.device)
            ok = t < self.seen.shape[1]
            self.seen[rows[ok], t[ok]] = True


class Dola:
    """DoLa on one model: hooks on the premature blocks keep their last-position outputs; `pick`
    turns the final logits and those into the next tokens (module doc)."""

    def __init__(self, model: torch.nn.Module, adapter: ArchitectureAdapter, spec: DolaSpec) -> None:
        self.spec = spec
        self.blocks = adapter.blocks(model)
        self.final = len(self.blocks) - 1
        bad = [i for i in spec.layers if i > self.final]
        if bad:
            raise JobFailed("invalid_layers", f"DoLa premature layers {bad} do not exist: the model has blocks "
                                              f"0-{self.final}")
        missing = [i for i in spec.layers if "block_output" not in self.blocks[i].sites]
        if missing:
            raise JobFailed("unsupported_architecture", f"cannot read the output of blocks {missing}")
        self.lens: LogitLens = adapter.logit_lens(model)
        self._last: dict[int, torch.Tensor] = {}
        self._checked = False

    @contextmanager
    def hooks(self) -> Iterator[None]:
        """Keep each hooked block's last-position output of every forward pass (the last block
        too until the lens has been checked against the model's logits)."""
        wanted = {i for i in self.spec.layers if i != self.final} | ({self.final} if not self._checked else set())
        handles = []

        def keep(i: int) -> Any:
            def fn(t: torch.Tensor) -> None:
                self._last[i] = t[:, -1, :].detach()
            return fn

        try:
            for i in sorted(wanted):
                handles.append(self.blocks[i].sites["block_output"].register(keep(i)))
            yield
        finally:
            for h in handles:
                h.remove()
            self._last.clear()

    def start(self, prompts: Sequence[Sequence[int]]) -> DolaState:
        """The state of a batch whose rows read `prompts` (token ids)."""
        keep = self.spec.repetition_penalty != 1.0
        n = len(prompts)
        return DolaState([list(p) for p in prompts] if keep else None, counts=[{} for _ in range(n)],
                         active=list(range(n)))

    def _check_lens(self, final_logits: torch.Tensor) -> None:
        """The lens applied to the last block's output must give the model's own logits: a wrong
        final norm or head found for an architecture fails here instead of decoding nonsense."""
        if self._checked:
            return
        got = self.lens(self._last[self.final]).to(final_logits.device)
        scale = float(final_logits.abs().max()) if final_logits.numel() else 0.0
        err = float((got - final_logits).abs().max()) if final_logits.numel() else 0.0
        if not err <= 1e-3 + 2e-2 * scale:
            raise JobFailed(
                "unsupported_architecture",
                f"DoLa reads layers through the final norm ({self.lens.norm_path or 'none found'}) and the LM head, "
                f"but applied to the last block they differ from the model's logits by {err:.3g}: this "
                "architecture maps its last hidden state to logits in a way layerscope does not know",
            )
        self._checked = True

    def premature_logp(self, final_logp: torch.Tensor) -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        for i in self.spec.layers:
            if i == self.final:
                out[i] = final_logp
            else:
                out[i] = torch.log_softmax(self.lens(self._last[i]).to(final_logp.device), dim=-1)
        return out

    def pick(self, final_logits: torch.Tensor, state: DolaState, temperature: float,
             generator: torch.Generator | None) -> torch.Tensor:
        """The next token of every row (module doc); counts the chosen premature layers."""
        self._check_lens(final_logits)
        final_logp = torch.log_softmax(final_logits, dim=-1)
        layers = list(self.spec.layers)
        prem = self.premature_logp(final_logp)
        if len(layers) == 1:
            chosen = torch.zeros(final_logp.shape[0], dtype=torch.long, device=final_logp.device)
            base = prem[layers[0]]
        else:
            stacked = torch.stack([prem[i] for i in layers], dim=0)  # [k, rows, vocab]
            chosen = js_divergence(final_logp, stacked).argmax(dim=0)  # first of equal ones
            base = stacked[chosen, torch.arange(final_logp.shape[0], device=final_logp.device)]
        for row, c in zip(state.active, chosen.cpu().tolist(), strict=True):
            state.counts[row][layers[c]] = state.counts[row].get(layers[c], 0) + 1
        scores = contrast_scores(final_logp, base, self.spec.alpha)
        seen = state.seen_mask(scores.shape[1], scores.device)
        if seen is not None:
            scores = repetition_penalty(scores, seen, self.spec.repetition_penalty)
        if generator is None:
            nxt = choose_greedy(scores, final_logits)
        else:
            probs = torch.softmax(scores / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        state.add(nxt)
        return nxt
