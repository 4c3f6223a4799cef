"""Log-likelihood scoring: the one primitive every likelihood benchmark is built on.

A *request* is a (context, continuation) pair; its score is log P(continuation | context) summed
over the continuation's tokens, plus whether greedy decoding would have produced exactly those
tokens. Multiple-choice tasks, rolling perplexity, the contamination permutation test, the LM
judge and the lm-evaluation-harness adapter all reduce to lists of requests.

Semantics follow lm-evaluation-harness so numbers are comparable (and tested equal):

- Trailing whitespace of the context moves to the continuation, and the continuation's tokens
  are those of ``encode(context + continuation)`` after the first ``len(encode(context))`` -- so
  a word is tokenised as it would be in running text.
- An empty context is replaced by a prefix token (BOS, else EOS) so the first continuation token
  has something to condition on.
- A request longer than the model's context is cut from the left (the continuation is kept
  whole; a continuation longer than the context is an error the caller counts as a skip).

Why it is fast (requests/s against the harness's Hugging Face backend in benchmarks/):

- identical token sequences are scored once (duplicate requests are common across few-shot
  prompts and tasks);
- requests that share a context (the choices of a multiple-choice item) share one row: the
  context once, then each continuation's tokens as a segment that attends to the context and to
  itself only (a tree mask; positions continue from the context), so the context is not re-run
  per choice. A single-token continuation needs no segment at all (it is predicted from the
  context's last position), so a 4-choice letter-answer item costs one context forward instead
  of four. Only for models that take position ids and a mask (`hidden_states`) and have no
  sliding window; `share_context=False` turns it off;
- requests are sorted by length and packed into batches under a token budget, so padding is
  small and a batch of short requests is wide;
- batches are right-padded and run with the plain causal mask: with right padding, real tokens
  never attend to pads, so no mask tensor is built;
- the vocabulary projection (the largest matmul for small models) is applied only at the
  positions that predict continuation tokens, not at every position.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import DataError

Pair = tuple[list[int], list[int]]


@dataclass
class _Unit:
    """One input row: a context and the (request index, continuation ids) scored after it."""

    ctx: list[int]
    conts: list[tuple[int, list[int]]]

    @property
    def length(self) -> int:
        return len(self.ctx) + sum(len(c) - 1 for _, c in self.conts)


@dataclass
class ScoreStats:
    """What the last scoring call had to do to fit requests into the model."""

    requests: int = 0
    unique: int = 0
    truncated: int = 0  # context cut from the left to fit
    batches: int = 0
    tokens: int = 0  # tokens fed to the model (after dedup, before padding)


def rolling_windows(
    tokens: Sequence[int], prefix_token: int, max_len: int, context_len: int = 1
) -> Iterator[Pair]:
    """Disjoint (context, continuation) windows covering `tokens` so each token is predicted once.

    The first window predicts the first ``max_len`` tokens after `prefix_token`; each later window
    predicts up to ``max_len - context_len + 1`` new tokens and is filled on the left with as much
    preceding text as fits in ``max_len`` (so the last window always has a full context).
    ``context_len=1`` is lm-evaluation-harness' ``loglikelihood_rolling``; a larger value is the
    sliding-window ("strided") perplexity: every token sees at least ``context_len - 1`` earlier
    tokens at the price of more forward passes.
    """
    if not 1 <= context_len <= max_len:
        raise ValueError(f"context_len must be in [1, max_len={max_len}], got {context_len}")
    tokens = list(tokens)
    if not tokens:
        return
    pred_len = max_len - context_len + 1
    first = min(max_len, len(tokens))
    yield [prefix_token], tokens[:first]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, pred_len)
        end = done + n
        window = tokens[max(end - max_len - 1, 0) : end]
        yield window[:-n], window[-n:]
        done = end


class Scorer:
    """Batched log-likelihoods of token or text requests under a causal LM.

    `model` is an lmforge `Transformer` (fast path: hidden states + head at the needed positions
    only) or any module whose call returns logits (or an object with `.logits`, e.g. a
    `transformers` model). `tokenizer` is an `LMTokenizer` (needed for text requests).
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        max_len: int | None = None,
        batch_tokens: int = 8192,
        max_batch: int = 128,
        add_bos: bool = True,
        device: torch.device | str | None = None,
        share_context: bool = True,
    ):
        self.model = model
        self.tok = tokenizer
        cfg = getattr(model, "cfg", None)
        self.max_len = int(max_len or getattr(cfg, "max_seq_len", 0) or 2048)
        self.batch_tokens = max(int(batch_tokens), self.max_len)
        self.max_batch = max_batch
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.vocab = getattr(cfg, "vocab_size", None)
        bos = getattr(tokenizer, "bos_id", None) if tokenizer is not None else None
        eos = getattr(tokenizer, "eos_id", None) if tokenizer is not None else None
        self.add_bos = bool(add_bos and bos is not None)
        self.bos_id = bos
        self.prefix_id = bos if bos is not None else eos
        self.stats = ScoreStats()
        self.share = bool(
            share_context and hasattr(model, "hidden_states") and getattr(cfg, "sliding_window", None) is None
        )

    # ------------------------------------------------------------------ text -> tokens
    def encode(self, text: str) -> list[int]:
        if self.tok is None:
            raise ValueError("this Scorer has no tokenizer; pass token ids instead of text")
        return self.tok.encode(text)

    def context_ids(self, context: str) -> list[int]:
        ids = self.encode(context) if context else []
        if not self.add_bos:
            return ids
        assert self.bos_id is not None  # add_bos is only set when the tokenizer has a BOS
        return [self.bos_id, *ids]

    def encode_pair(self, context: str, continuation: str) -> Pair:
        """(context ids, continuation ids) with the harness's whitespace and prefix rules."""
        if not context:
            cont = self.encode(continuation)
            if self.add_bos:
                assert self.bos_id is not None
                return [self.bos_id], cont
            if self.prefix_id is not None and (not cont or cont[0] != self.prefix_id):
                return [self.prefix_id], cont
            return cont[:1], cont[1:]
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.context_ids(context + continuation)
        ctx = self.context_ids(context)
        return ctx, whole[len(ctx) :]

    # ------------------------------------------------------------------ scoring
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """log P(continuation | context) and is-greedy for each (context, continuation) text pair."""
        return self.score([self.encode_pair(c, x) for c, x in requests])

    def fits(self, pair: Pair) -> bool:
        """Whether the continuation fits in the model's context (the context may be cut)."""
        return 0 < len(pair[1]) <= self.max_len

    @torch.no_grad()
    def score(self, pairs: Sequence[Pair], *, greedy: bool = True) -> list[tuple[float, bool]]:
        """Scores of token-id (context, continuation) pairs, in input order."""
        stats = ScoreStats(requests=len(pairs))
        keys: dict[tuple, int] = {}
        rows: list[tuple[list[int], int]] = []  # (input ids, number of scored positions)
        which: list[int] = []
        for i, (ctx, cont) in enumerate(pairs):
            if len(cont) == 0:
                which.append(-1)
                continue
            if len(cont) > self.max_len:
                raise DataError(
                    f"request {i}: continuation of {len(cont)} tokens is longer than the model "
                    f"context ({self.max_len}); it cannot be scored (skip it or use a longer-context model)"
                )
            if not ctx:
                raise ValueError(
                    f"request {i}: empty context ids; use encode_pair, which adds a prefix token"
                )
            full = list(ctx) + list(cont)
            if len(full) > self.max_len + 1:
                stats.truncated += 1
                full = full[-(self.max_len + 1) :]
            key = (tuple(full), len(cont))
            j = keys.get(key)
            if j is None:
                j = keys[key] = len(rows)
                rows.append((full, len(cont)))
            which.append(j)
        stats.unique = len(rows)
        if self.vocab is not None:
            top = max((max(r[0]) for r in rows), default=-1)
            if top >= self.vocab:
                raise DataError(
                    f"token id {top} >= model vocabulary size {self.vocab}: the tokenizer does not "
                    f"belong to this checkpoint (use the tokenizer saved with the model)"
                )
        results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        units = self._units(rows)
        order = sorted(range(len(units)), key=lambda u: -units[u].length)
        for batch in self._batches(order, units):
            stats.batches += 1
            stats.tokens += sum(units[u].length for u in batch)
            for j, res in self._score_batch([units[u] for u in batch], greedy):
                results[j] = res
        self.stats = stats
        return [results[j] if j >= 0 else (0.0, True) for j in which]

    def _units(self, rows: list[tuple[list[int], int]]) -> list[_Unit]:
        """Rows of the model's input: a context and the continuations scored after it (one per
        unique request, or every request sharing that context when `share` is on, as many per
        unit as fit in `max_len` input tokens)."""
        if not self.share:
            return [_Unit(full[:-n], [(j, full[-n:])]) for j, (full, n) in enumerate(rows)]
        by_ctx: dict[tuple[int, ...], list[int]] = {}
        for j, (full, n) in enumerate(rows):
            by_ctx.setdefault(tuple(full[:-n]), []).append(j)
        units: list[_Unit] = []
        for ctx, members in by_ctx.items():
            unit = _Unit(list(ctx), [])
            for j in members:
                cont = rows[j][0][-rows[j][1] :]
                if unit.conts and unit.length + len(cont) - 1 > self.max_len:
                    units.append(unit)
                    unit = _Unit(list(ctx), [])
                unit.conts.append((j, cont))
            units.append(unit)
        return units

    def _batches(self, order: list[int], units: list[_Unit]) -> Iterator[list[int]]:
        batch: list[int] = []
        width = 0
        for u in order:
            n = units[u].length
            w = max(width, n)
            if batch and (w * (len(batch) + 1) > self.batch_tokens or len(batch) >= self.max_batch):
                yield batch
                batch, w = [], n
            batch.append(u)
            width = w
        if batch:
            yield batch

    def _score_batch(self, units: list[_Unit], greedy: bool) -> list[tuple[int, tuple[float, bool]]]:
        B, T = len(units), max(u.length for u in units)
        x = torch.zeros(B, T, dtype=torch.long)
        pos = torch.arange(T).repeat(B, 1)
        tree = any(sum(len(c) > 1 for _, c in u.conts) > 1 for u in units)
        allowed = torch.ones(T, T, dtype=torch.bool).tril().repeat(B, 1, 1) if tree else None
        b_idx: list[int] = []
        t_idx: list[int] = []
        targets: list[int] = []
        owner: list[int] = []
        ids: list[int] = []
        for i, unit in enumerate(units):
            L = len(unit.ctx)
            x[i, :L] = torch.tensor(unit.ctx)
            start = L
            for j, cont in unit.conts:
                seg = len(cont) - 1  # the continuation's tokens but its last are inputs
                x[i, start : start + seg] = torch.tensor(cont[:-1], dtype=torch.long)
                pos[i, start : start + seg] = torch.arange(L, L + seg)
                if allowed is not None:  # a segment sees the context and itself, not the others
                    allowed[i, start : start + seg, L:start] = False
                b_idx += [i] * len(cont)
                t_idx += [L - 1, *range(start, start + seg)]
                targets += cont
                owner += [len(ids)] * len(cont)
                ids.append(j)
                start += seg
        x = x.to(self.device)
        b = torch.tensor(b_idx, device=self.device)
        t = torch.tensor(t_idx, device=self.device)
        if allowed is not None:
            logits = self._logits_at(x, b, t, pos.to(self.device), allowed[:, None].to(self.device))
        else:
            logits = self._logits_at(x, b, t)
        logp = F.log_softmax(logits.float(), dim=-1)
        tgt = torch.tensor(targets, device=self.device)
        tok_lp = logp.gather(1, tgt[:, None]).squeeze(1)
        own = torch.tensor(owner, device=self.device)
        N = len(ids)
        sums = torch.zeros(N, dtype=torch.float64, device=self.device).index_add_(0, own, tok_lp.double())
        if greedy:
            miss = (logp.argmax(-1) != tgt).to(torch.int64)
            misses = torch.zeros(N, dtype=torch.int64, device=self.device).index_add_(0, own, miss)
            ok = (misses == 0).tolist()
        else:
            ok = [False] * N
        return [(j, (float(sm), bool(g))) for j, sm, g in zip(ids, sums.tolist(), ok)]

    def _logits_at(
        self, x: torch.Tensor, b: torch.Tensor, t: torch.Tensor, pos=None, mask=None
    ) -> torch.Tensor:
        """Logits at positions (b, t) of the batch, [N, vocab]; `pos` and `mask` (positions
        [B, T], allowed [B, 1, T, T]) for rows of shared-context segments."""
        m = self.model
        if mask is not None:
            return m.lm_head(m.hidden_states(x, position_ids=pos, attn_mask=mask)[b, t])
        if hasattr(m, "hidden_states") and hasattr(m, "lm_head"):
            h = m.hidden_states(x)
            return m.lm_head(h[b, t])
        out = m(x)
        logits = getattr(out, "logits", out)
        return logits[b, t]

    # ------------------------------------------------------------------ rolling
    def rolling_pairs(self, ids: Sequence[int], context_len: int = 1) -> list[Pair]:
        if self.prefix_id is None:
            raise ValueError("rolling log-likelihood needs a BOS or EOS token to start the first window")
        return list(rolling_windows(ids, self.prefix_id, self.max_len, context_len))

    def loglikelihood_rolling_ids(self, docs: Sequence[Sequence[int]], context_len: int = 1) -> list[float]:
        """Total log-likelihood of each token sequence, every token predicted exactly once."""
        pairs, owner = [], []
        for d, ids in enumerate(docs):
            for p in self.rolling_pairs(ids, context_len):
                pairs.append(p)
                owner.append(d)
        totals = [0.0] * len(docs)
        for d, (lp, _) in zip(owner, self.score(pairs, greedy=False)):
            totals[d] += lp
        return totals

    def loglikelihood_rolling(self, texts: Sequence[str], context_len: int = 1) -> list[float]:
        return self.loglikelihood_rolling_ids([self.encode(t) for t in texts], context_len)


def logsumexp(values: Iterable[float]) -> float:
    v = list(values)
    m = max(v)
    return m + math.log(sum(math.exp(x - m) for x in v))
