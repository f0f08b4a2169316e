"""QA generation for the hallucination stage (docs/method.md sections 4-5).

Prompts
- `build_prompt`: a few-shot prompt from training examples (`Question: ...` /
  `Answer: ...` blocks, the first gold alias as the shot's answer), or, with
  `use_chat_template` and a tokenizer that has one, the same shots as chat turns
  (user question, assistant answer) ending with the generation prompt.
- `verbalized_prompt`: the answer prompt followed by the model's answer and a
  request for its confidence (0-100), plain or as one more chat turn.
- `pick_shots`: which training examples become shots (seeded).

Generation (`generate`)
- Batched, deterministic, without `model.generate`: a loop over a KV cache so
  that the prompt part shared by every prompt (the few-shot block) is run once
  and reused by every batch **(choice: an exact speed-up, the model sees the
  same token ids as without it; only floating-point summation order differs)**.
  Each row is laid out `[shared prefix][left padding][own suffix]`, with the
  padding masked out and positions counted on real tokens only, so every row's
  next-token logits sit at the last position.
- Greedy (`temperature=0`) or sampled at a temperature (`num_samples` per
  prompt, a seeded `torch.Generator`, so samples do not depend on the global RNG
  and the same seed gives the same samples).
- A row stops at the first token whose text contains a newline, at an EOS
  token, or after `max_new_tokens`. The answer is the decoded text before the
  first newline, stripped; its tokens (those before the stopping token, plus the
  stopping token when text precedes its newline) carry the log-probabilities of
  the sequence-likelihood detector. Log-probabilities are always those of the
  model at temperature 1, also for sampled tokens.
- Optionally the final hidden state (`hidden_states[-1]`, after the model's
  final norm where it has one) at the last prompt token, for the P(IK) probe.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from worker.lm.batching import AutoBatch
from worker.stage import JobContext, JobFailed

__all__ = [
    "DEFAULT_INSTRUCTION",
    "VERBALIZED_QUESTION",
    "Generation",
    "GenerationRun",
    "build_prompt",
    "first_alias",
    "generate",
    "parse_verbalized",
    "pick_shots",
    "stop_token_ids",
    "verbalized_prompt",
]

DEFAULT_INSTRUCTION = "Answer each question with a short answer."
VERBALIZED_QUESTION = (
    "How confident are you that this answer is correct? Reply with a number from 0 to 100."
)


def first_alias(gold: str | Sequence[str]) -> str:
    """The first gold alias (aliases are joined by '; ')."""
    if isinstance(gold, str):
        parts = [p.strip() for p in gold.split("; ") if p.strip()]
    else:
        parts = [str(p).strip() for p in gold if str(p).strip()]
    return parts[0] if parts else ""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def pick_shots(n_items: int, n_shots: int, seed: int, eligible: Sequence[bool] | None = None) -> list[int]:
    """`n_shots` distinct indices in 0..n_items-1 (only `eligible` ones), chosen by `seed`,
    in the order drawn."""
    pool = np.arange(n_items) if eligible is None else np.flatnonzero(np.asarray(eligible, dtype=bool))
    if n_shots <= 0 or pool.size == 0:
        return []
    rng = np.random.default_rng(seed)
    take = min(n_shots, pool.size)
    return [int(i) for i in rng.permutation(pool)[:take]]


def _chat_template_ok(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _chat_messages(
    question: str, shots: Sequence[tuple[str, str]], instruction: str
) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    turns = [*shots, (question, None)]
    for i, (q, a) in enumerate(turns):
        content = f"Question: {_one_line(q)}"
        if i == 0 and instruction:
            content = f"{instruction}\n\n{content}"
        messages.append({"role": "user", "content": content})
        if a is not None:
            messages.append({"role": "assistant", "content": _one_line(a)})
    return messages


def build_prompt(
    question: str,
    shots: Sequence[tuple[str, str]],
    *,
    instruction: str = DEFAULT_INSTRUCTION,
    tokenizer: Any = None,
    use_chat_template: bool = False,
) -> str:
    """The answer prompt for `question` with `shots` (question, answer) pairs.

    Plain form (also the fallback when the tokenizer has no chat template)::

        {instruction}

        Question: {q1}
        Answer: {a1}

        ...
        Question: {question}
        Answer:

    Newlines inside questions and answers are collapsed to spaces, so a newline in
    the output always ends the answer.
    """
    if use_chat_template and tokenizer is not None and _chat_template_ok(tokenizer):
        return tokenizer.apply_chat_template(
            _chat_messages(question, shots, instruction), tokenize=False, add_generation_prompt=True
        )
    parts = [f"{instruction}\n\n"] if instruction else []
    for q, a in shots:
        parts.append(f"Question: {_one_line(q)}\nAnswer: {_one_line(a)}\n\n")
    parts.append(f"Question: {_one_line(question)}\nAnswer:")
    return "".join(parts)


def verbalized_prompt(
    question: str,
    answer: str,
    shots: Sequence[tuple[str, str]],
    *,
    instruction: str = DEFAULT_INSTRUCTION,
    tokenizer: Any = None,
    use_chat_template: bool = False,
) -> str:
    """The answer prompt, the model's `answer`, then `VERBALIZED_QUESTION`; the model's
    next line is parsed by `parse_verbalized`."""
    if use_chat_template and tokenizer is not None and _chat_template_ok(tokenizer):
        messages = _chat_messages(question, shots, instruction)
        messages.append({"role": "assistant", "content": _one_line(answer)})
        messages.append({"role": "user", "content": VERBALIZED_QUESTION})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    base = build_prompt(question, shots, instruction=instruction)
    return f"{base} {_one_line(answer)}\n{VERBALIZED_QUESTION}\nConfidence (0-100):"


_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:\.\d+)?)\s*(%|percent)?")


def parse_verbalized(text: str) -> float | None:
    """The first number in `text` that lies in 0..100, as a confidence in [0, 1]
    ("85", "85%", "85.5", "Confidence: 90/100"); None when there is none."""
    for m in _NUMBER.finditer(text or ""):
        value = float(m.group(1))
        if 0.0 <= value <= 100.0:
            return value / 100.0
    return None


# ------------------------------------------------------------------------ stop tokens

_STOP_CACHE: dict[int, tuple[Any, frozenset[int]]] = {}


def stop_token_ids(tokenizer: Any, model: Any = None) -> frozenset[int]:
    """Ids whose decoded text contains a newline, plus the EOS id(s) of the tokenizer and
    of the model's generation config. Cached per tokenizer object."""
    key = id(tokenizer)
    cached = _STOP_CACHE.get(key)
    if cached is not None and cached[0] is tokenizer:
        newline = cached[1]
    else:
        vocab = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(vocab)])
        newline = frozenset(i for i, t in enumerate(texts) if "\n" in t)
        if len(_STOP_CACHE) > 8:
            _STOP_CACHE.clear()
        _STOP_CACHE[key] = (tokenizer, newline)
    eos: set[int] = set()
    for source in (tokenizer, getattr(model, "generation_config", None)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            eos.add(value)
        elif isinstance(value, (list, tuple)):
            eos.update(int(v) for v in value)
    return newline | frozenset(eos)


# ------------------------------------------------------------------------ generation


@dataclass
class Generation:
    """One generated answer."""

    text: str  # the answer: decoded text before the first newline, stripped
    completion: str  # the decoded answer tokens cut at the newline (prompt + completion is what was read)
    token_ids: list[int]  # the answer tokens
    logprobs: list[float]  # their log-probabilities (temperature 1)
    stop: str  # "newline" | "eos" | "max_tokens"

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def mean_logprob(self) -> float | None:
        return float(np.mean(self.logprobs)) if self.logprobs else None


@dataclass
class GenerationRun:
    """`generations[i * num_samples + j]` is sample j of prompt i."""

    generations: list[Generation]
    last_hidden: np.ndarray | None = None  # [prompts, d_model] float32
    prompt_tokens: list[int] = field(default_factory=list)  # per prompt
    shared_prefix_tokens: int = 0
    batches: int = 0


def _kwarg_names(model: Any) -> tuple[str, bool]:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    cache_name = "cache" if "cache" in params else "past_key_values"
    return cache_name, "logits_to_keep" in params


def _out_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _max_positions(model: Any) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    if not seqs:
        return 0
    first = seqs[0]
    n = min(len(s) for s in seqs) - 1  # every row keeps at least one token of its own
    k = 0
    while k < n and all(s[k] == first[k] for s in seqs):
        k += 1
    return max(k, 0)


def _finish(tokenizer: Any, ids: list[int], lps: list[float], stops: frozenset[int],
            newline: frozenset[int], hit_max: bool) -> Generation:
    """Cut a row's tokens at the stop token; see module doc."""
    stop = "max_tokens" if hit_max else "eos"
    keep = len(ids)
    partial = False
    for i, t in enumerate(ids):
        if t in stops:
            keep = i
            if t in newline:
                stop = "newline"
                before = tokenizer.decode([t]).split("\n", 1)[0]
                partial = bool(before.strip())
            else:
                stop = "eos"
            break
    n = keep + (1 if partial else 0)
    answer_ids = [int(t) for t in ids[:n]]
    text = tokenizer.decode(answer_ids, skip_special_tokens=True) if answer_ids else ""
    completion = text.split("\n", 1)[0]
    return Generation(
        text=completion.strip(),
        completion=completion.rstrip(),
        token_ids=answer_ids,
        logprobs=[float(x) for x in lps[:n]],
        stop=stop,
    )


@torch.inference_mode()
def generate(
    loaded: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    temperature: float = 0.0,
    num_samples: int = 1,
    seed: int = 0,
    capture_last_hidden: bool = False,
    ctx: JobContext | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> GenerationRun:
    """Answer every prompt (see module doc). `batch_size` counts rows (prompt x sample).
    `on_batch(done, total)` is called after each batch; `ctx.check_cancelled()` before
    each batch. Raises `JobFailed("prompt_too_long")` when a prompt plus the answer
    budget exceeds the model's context."""
    model = loaded.model
    tokenizer = loaded.tokenizer
    if not getattr(loaded, "is_causal_lm", True):
        raise JobFailed("model_unsupported", "generation needs a causal language model")
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if num_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError("num_samples, max_new_tokens and batch_size must be >= 1")
    greedy = temperature == 0.0
    n_prompts = len(prompts)
    if n_prompts == 0:
        return GenerationRun(generations=[], last_hidden=None)

    device = next(model.parameters()).device
    cache_kw, has_keep = _kwarg_names(model)
    stops = stop_token_ids(tokenizer, model)
    newline = frozenset(t for t in stops if "\n" in tokenizer.decode([t]))
    stop_mask = torch.zeros(len(tokenizer) + 1, dtype=torch.bool)
    stop_mask[[t for t in stops if t < stop_mask.numel()]] = True
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    enc = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    enc = [list(map(int, ids)) for ids in enc]
    limit = _max_positions(model)
    longest = max(len(x) for x in enc)
    if limit is not None and longest + max_new_tokens > limit:
        raise JobFailed(
            "prompt_too_long",
            f"a prompt has {longest} tokens; with max_new_tokens={max_new_tokens} that exceeds the model's "
            f"context of {limit} tokens. Use fewer shots (n_shots) or shorter questions.",
        )
    p = _common_prefix(enc)
    prefix = torch.tensor([enc[0][:p]], dtype=torch.long, device=device)
    prefix_cache = None
    was_training = model.training
    model.eval()
    try:
        if p > 0:
            kw: dict[str, Any] = {cache_kw: None, "use_cache": True}
            if has_keep:
                kw["logits_to_keep"] = 1
            out = model(input_ids=prefix, attention_mask=torch.ones_like(prefix), **kw)
            prefix_cache = _out_cache(out)
            del out

        rows = [(i, j) for i in range(n_prompts) for j in range(num_samples)]
        # Longest suffix first: less padding, and an out-of-memory shows at once.
        rows.sort(key=lambda r: (-len(enc[r[0]]), r[0], r[1]))
        # OOM back-off (worker/lm/batching.py): a batch that runs out of memory is run again as
        # two halves; it writes only its own rows, so a retry rewrites them.
        batcher = AutoBatch("generate", model, batch_size)
        results: list[Generation | None] = [None] * (n_prompts * num_samples)
        hidden: np.ndarray | None = None

        def run_batch(batch: list[tuple[int, int]]) -> None:
            nonlocal hidden
            b_idx = batcher.done  # the batch's index: its sampling seed
            if ctx is not None:
                ctx.check_cancelled()
            generator = None
            if not greedy:
                generator = torch.Generator(device=device)
                generator.manual_seed((int(seed) * 1_000_003 + b_idx) % (2**63 - 1))
            suffixes = [enc[i][p:] for i, _ in batch]
            width = max(len(s) for s in suffixes)
            bsz = len(batch)
            ids = torch.full((bsz, width), pad, dtype=torch.long)
            mask = torch.zeros((bsz, p + width), dtype=torch.long)
            mask[:, :p] = 1
            for r, s in enumerate(suffixes):
                ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
                mask[r, p + width - len(s) :] = 1
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, p:]
            ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
            cache = None
            if prefix_cache is not None:
                cache = copy.deepcopy(prefix_cache)
                if bsz > 1:
                    cache.batch_repeat_interleave(bsz)
            kw = {cache_kw: cache, "use_cache": True}
            if has_keep:
                kw["logits_to_keep"] = 1
            out = model(
                input_ids=ids, attention_mask=mask, position_ids=positions,
                output_hidden_states=capture_last_hidden, **kw,
            )
            if capture_last_hidden:
                last = out.hidden_states[-1][:, -1, :].float().cpu().numpy()
                if hidden is None:
                    hidden = np.zeros((n_prompts, last.shape[-1]), dtype=np.float32)
                for r, (i, j) in enumerate(batch):
                    if j == 0:
                        hidden[i] = last[r]
            cache = _out_cache(out)
            logits = out.logits[:, -1, :].float()
            del out
            pos = positions[:, -1]
            active = torch.arange(bsz, device=device)  # batch rows still generating
            toks: list[list[int]] = [[] for _ in range(bsz)]
            lps: list[list[float]] = [[] for _ in range(bsz)]
            done = [False] * bsz
            for step in range(max_new_tokens):
                logp = torch.log_softmax(logits, dim=-1)
                if greedy:
                    nxt = torch.argmax(logits, dim=-1)
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
                chosen = logp.gather(1, nxt[:, None]).squeeze(-1).cpu().tolist()
                nxt_cpu = nxt.cpu()
                for k, row in enumerate(active.cpu().tolist()):
                    toks[row].append(int(nxt_cpu[k]))
                    lps[row].append(float(chosen[k]))
                is_stop = stop_mask[nxt_cpu.clamp(max=stop_mask.numel() - 1)]
                for k, row in enumerate(active.cpu().tolist()):
                    if bool(is_stop[k]):
                        done[row] = True
                if all(done) or step == max_new_tokens - 1:
                    break
                keep = ~is_stop.to(device)
                if not bool(keep.all()):
                    idx = torch.nonzero(keep).squeeze(-1)
                    cache.batch_select_indices(idx)
                    nxt, mask, pos, active = nxt[idx], mask[idx], pos[idx], active[idx]
                mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=device)], dim=1)
                pos = pos + 1
                kw = {cache_kw: cache, "use_cache": True}
                out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None], **kw)
                cache = _out_cache(out)
                logits = out.logits[:, -1, :].float()
                del out
            for r, (i, j) in enumerate(batch):
                results[i * num_samples + j] = _finish(
                    tokenizer, toks[r], lps[r], stops, newline, hit_max=not done[r]
                )
            del cache

        for _ in batcher.run(rows, run_batch):
            if on_batch is not None:
                on_batch(batcher.done, batcher.total)
    finally:
        if was_training:
            model.train()
    assert all(g is not None for g in results)
    return GenerationRun(
        generations=[g for g in results if g is not None],
        last_hidden=hidden,
        prompt_tokens=[len(x) for x in enc],
        shared_prefix_tokens=p,
        batches=batcher.done,
    )
