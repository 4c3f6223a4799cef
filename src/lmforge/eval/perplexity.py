"""Loss, perplexity and bits-per-byte on a token shard.

Bits-per-byte (bpb) makes models with different tokenizers comparable: the summed negative
log-likelihood of the text, in bits, divided by the text's UTF-8 bytes. Every target token is
charged the bytes it spells; special tokens (BOS/EOS, chat markers) spell none and are left out
of both sums, as in nanochat's evaluation. Loss and perplexity are per token over all targets.

The unigram baseline is the bpb of a model that ignores context: token frequencies counted on
the training split (add-one smoothed), scored on the same validation targets. A trained model
that does not beat it has learned nothing beyond token frequencies.

`document_metrics` scores whole documents instead of fixed windows of a token stream: each
document separately, from a BOS prefix, long ones with the rolling window of
`loglik.rolling_windows` (every token predicted exactly once, the last window with a full
context; ``context_len`` > 1 gives the sliding-window variant). Besides token perplexity it
reports word perplexity (per whitespace-separated word, as lm-evaluation-harness's wikitext) and
byte perplexity / bits-per-byte over the documents' UTF-8 bytes -- the numbers that compare
across tokenizers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.shards import iter_eval_windows


def token_byte_lengths(tok) -> np.ndarray:
    """UTF-8 bytes spelled by each token id; 0 for special tokens."""
    inner = tok.tokenizer
    n = inner.get_vocab_size(with_added_tokens=True)
    special = {i for i, t in inner.get_added_tokens_decoder().items() if t.special}
    byte_of = _byte_decoder()
    out = np.zeros(n, dtype=np.int64)
    for i in range(n):
        if i in special:
            continue
        piece = inner.id_to_token(i)
        if piece is None:
            continue
        if all(c in byte_of for c in piece):
            out[i] = len(piece)  # byte-level: one character per byte
        else:  # e.g. SentencePiece-style vocabularies
            out[i] = len(tok.decode([i]).encode("utf-8"))
    return out


def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes<->unicode table, inverted (the alphabet byte-level BPE spells tokens in)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


@torch.no_grad()
def evaluate_shard(
    model,
    shard,
    token_bytes: np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    max_tokens: int | None = None,
) -> dict[str, float]:
    """loss (nats/token), perplexity, bpb and the counts they were computed on."""
    was_training = model.training
    model.eval()
    tb = torch.as_tensor(token_bytes, device=device)
    nll_sum, n_tok, nll_bytes, n_bytes = 0.0, 0, 0.0, 0
    for x, y in iter_eval_windows(shard, seq_len, batch_size, max_tokens=max_tokens):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        nll = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), reduction="none")
        nll_sum += float(nll.sum())
        n_tok += y.numel()
        b = tb[y.view(-1)]
        keep = b > 0
        nll_bytes += float(nll[keep].sum())
        n_bytes += int(b.sum())
    if was_training:
        model.train()
    if n_tok == 0:
        return {}
    loss = nll_sum / n_tok
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bpb": nll_bytes / (math.log(2) * max(n_bytes, 1)),
        "tokens": n_tok,
        "bytes": n_bytes,
    }


def unigram_bpb(
    train_tokens: np.ndarray,
    val_shard,
    token_bytes: np.ndarray,
    *,
    seq_len: int,
    max_tokens: int | None = None,
) -> float:
    """bpb of an add-one-smoothed unigram model on exactly the targets `evaluate_shard` scores."""
    V = len(token_bytes)
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=V)[:V].astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    nll, nbytes = 0.0, 0
    for _, y in iter_eval_windows(val_shard, seq_len, 64, max_tokens=max_tokens):
        t = y.numpy().reshape(-1)
        b = token_bytes[t]
        keep = b > 0
        nll -= float(logp[t[keep]].sum())
        nbytes += int(b.sum())
    return nll / (math.log(2) * max(nbytes, 1))


def shard_documents(shard, tok, *, max_tokens: int | None = None, max_docs: int | None = None) -> list[str]:
    """Decode the documents of a token shard back to text (BOS stripped), in order, up to
    `max_tokens` tokens / `max_docs` documents (at least one document)."""
    ends = np.append(shard.doc_starts[1:], shard.n_tokens)
    out: list[str] = []
    used = 0
    bos = shard.meta.get("bos_id")
    for s, e in zip(shard.doc_starts, ends):
        ids = np.asarray(shard.tokens[s:e], dtype=np.int64)
        if len(ids) and bos is not None and ids[0] == bos:
            ids = ids[1:]
        if out and (
            (max_tokens is not None and used + len(ids) > max_tokens)
            or (max_docs is not None and len(out) >= max_docs)
        ):
            break
        out.append(tok.decode(ids.tolist()))
        used += len(ids)
    return out


def document_metrics(scorer, texts: Sequence[str], *, context_len: int = 1) -> dict[str, float]:
    """Token / word / byte perplexity and bits-per-byte of whole documents (rolling windows).

    `scorer` is an `eval.loglik.Scorer`. Words are runs of non-whitespace; empty documents are
    ignored."""
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        return {}
    ids = [scorer.encode(t) for t in texts]
    lls = scorer.loglikelihood_rolling_ids(ids, context_len)
    nll = -float(sum(lls))
    n_tok = sum(len(i) for i in ids)
    n_words = sum(len(re.split(r"\s+", t.strip())) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "docs": len(texts),
        "tokens": n_tok,
        "words": n_words,
        "bytes": n_bytes,
        "loss": nll / n_tok,
        "ppl": math.exp(min(nll / n_tok, 50.0)),
        "word_ppl": math.exp(min(nll / n_words, 700.0)),
        "byte_ppl": math.exp(min(nll / n_bytes, 50.0)),
        "bpb": nll / (math.log(2) * n_bytes),
        "context_len": context_len,
    }
