"""The set selector: an order-free policy that picks a pool's K images one at a time.

Why not the LSTM: MedSelect reads a pool as a sequence, so a row shuffle changes its picks, and it scores every
image at once, so it can spend two labels on near-twins. Here every input is a function of the pool as a *set*:

- **Pool-relative features** per image (each z-scored over the pool, so the scale of an encoder or a hospital
  does not leak in): log of the embedding's norm (the norm carries signal that L2-normalising drops), cosine to
  the pool's mean direction, Euclidean distance to the pool's mean, and three from a soft clustering around
  ``ANCHORS`` anchors (at most one per image) found by farthest-point sampling from the most central image — the
  image's cluster share (local density), its typicality (cosine to its soft cluster's centroid) and how close its
  nearest anchor is.
  With ``use_metadata``: sex, age (z-scored with the training store's statistics) and frontal view.
- With ``read_embedding``, the embedding itself too (centred on the pool): what images look like, which helps at
  the training hospital and may not travel.
- **Attention over the pool** through induced points (a Set Transformer's ISAB): cost grows as N·m, not N².
- **Sequential picks**: before each pick the policy sees, per image, how close it is to the picks so far (its
  k-center gain) and how much of its soft cluster is already picked; picked images are masked out.

Inference takes the argmax at each step (deterministic); training samples each step from the softmax
(:meth:`SetPolicy.sample`, REINFORCE with the exact log-probability of the sampled sequence), or —
distilled — raises the log-probability of a trained selector's picks (:meth:`SetPolicy.log_prob`). The module is
TorchScript-compatible, so ``xsel export`` writes the whole loop — encoding and the K steps — as one ONNX graph
and a site runs it with onnxruntime alone. Ties are broken by the lowest row, the only way row order can matter
(in forward: the chunked path's products round differently, so it may take exact duplicates in the other order).
"""

from __future__ import annotations

import math

import torch
from torch import nn

ANCHORS = 32  # farthest-point anchors of the soft clustering
TEMPERATURE = 0.05  # of the soft assignment to anchors (cosine / temperature)
GEOMETRY_FEATURES = 6
STEP_FEATURES = 3  # k-center gain, cluster already picked, share of K picked
LARGE_POOL_ROWS = 50_000  # the workstation runs larger pools chunk by chunk (both learned selectors' forward_in_chunks)
CHUNK_ROWS = 16_384  # rows per chunk there: measured faster than larger chunks at 10⁶ rows (the cache)
STEP_ROWS = 8_192  # rows per chunk of a large pool's pick steps (measured faster than 4,096 and 16,384 at 10⁶ rows)
SPECULATE, SPECULATED, CACHED_PAIRS = 32, 128, 16  # rows computed per pass, rows kept, (image, cosine) pairs per image


def _dot(rows: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """(B, N, D) · (B, 1, D) → (B, N) as a matrix product (BLAS, no (N, D) temporary). The cast names the type
    the ONNX exporter cannot infer for loop-carried values."""
    return torch.bmm(rows, vector.transpose(1, 2)).squeeze(-1).float()


def _unit_rows(raw: torch.Tensor, inverse: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The unit rows of image ``index`` of each pool: (B, N, D), (B, N), (B,) → (B, 1, D)."""
    b, d = raw.shape[0], raw.shape[2]
    row = raw.gather(1, index.view(b, 1, 1).expand(b, 1, d))
    return row * inverse.gather(1, index.view(b, 1)).unsqueeze(-1)


def _standardise(values: torch.Tensor) -> torch.Tensor:
    """Z-score over the pool (dim 1): the same image in a pool of another scale gets the same feature. A feature
    constant up to rounding (every image its own anchor in a tiny pool) stays near 0 instead of amplified noise."""
    centred = values - values.mean(dim=1, keepdim=True)
    floor = 1e-3 * values.abs().mean(dim=1, keepdim=True) + 1e-6
    return centred / ((centred * centred).mean(dim=1, keepdim=True).sqrt() + floor)


def _z_map(mean: float, variance: float) -> tuple[float, float]:
    """_standardise as an affine map (scale, shift) of the raw value, from the pool's mean and variance of it (the
    features it is used for are non-negative, so their mean is also their mean absolute value)."""
    scale = 1.0 / (math.sqrt(max(variance, 0.0)) + 1e-3 * abs(mean) + 1e-6)
    return scale, -mean * scale


def _by_chunk(spans: list[tuple[int, int]], compute) -> torch.Tensor:
    """``compute(start, end)`` of every chunk written into one tensor allocated once: never the chunks' list beside
    their concatenation (a 10⁶-row context would be held twice)."""
    first = compute(*spans[0])
    out = torch.empty((spans[-1][1], *first.shape[1:]), dtype=first.dtype)
    out[: len(first)] = first
    for start, end in spans[1:]:
        out[start:end] = compute(start, end)
    return out


class _Cosines:
    """Cosines of a large pool's rows to every image, ``SPECULATE`` rows per pass over the pool: one matrix product per
    chunk costs a few matrix-vector products, and the next pick is usually among the best-scored rows (the second
    best 3 times in 4 at 10⁶ rows). A row's entry keeps only the images whose cosine to it exceeds their ``nearest``
    when computed — nearest only grows, so that is all a later update can use — and entries are kept while their row
    stays among the ``SPECULATED`` best, within ``CACHED_PAIRS`` × N (image, cosine) pairs."""

    def __init__(self, raw: torch.Tensor, inverse: torch.Tensor, spans: list[tuple[int, int]]):
        self.raw, self.inverse, self.spans = raw, inverse, spans
        self.entries: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # row → per chunk (images, cosines)
        self.density = 1.0  # share of the pool in a fresh entry, as last measured: sizes a pass within the budget

    def raise_nearest(self, nearest: torch.Tensor, row: int, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``nearest`` ← max(nearest, cosine to ``row``) in place; returns the moved values before and after. On a
        miss, the best of ``logits`` (−inf: never picked) are computed alongside."""
        if row not in self.entries:
            self._compute(nearest, row, logits)
        images, cosines = (torch.cat(column) for column in zip(*self.entries.pop(row), strict=True))
        before = nearest[images]
        moved = cosines > before
        before, after = before[moved], cosines[moved]
        nearest[images[moved]] = after
        return before, after

    def _compute(self, nearest: torch.Tensor, row: int, logits: torch.Tensor) -> None:
        """Compute ``row`` and the best-scored uncached rows; keep the best within the budget — the entries kept
        from before at most half of it, and only as many fresh rows as the last density says fit beside them."""
        ranked = torch.topk(logits, min(SPECULATED, int(torch.isfinite(logits).sum()))).indices.tolist()
        budget = CACHED_PAIRS * len(nearest)
        entries, used = {}, 0
        for r in (r for r in ranked if r in self.entries):
            used += _pairs(self.entries[r])
            if used > budget / 2:
                break
            entries[r] = self.entries[r]
        room = int((budget - sum(_pairs(entry) for entry in entries.values())) / (self.density * len(nearest)))
        fresh = [row] + [r for r in ranked if r not in self.entries][: max(1, min(SPECULATE, room)) - 1]
        units = (self.raw[fresh] * self.inverse[fresh, None]).T
        self.entries = {}
        entries.update((r, []) for r in fresh)  # filled chunk by chunk, never joined: no transient copy
        for s, e in self.spans:
            block = (self.raw[s:e] @ units * self.inverse[s:e, None]).T  # (fresh, chunk)
            which, images = torch.nonzero(block > nearest[s:e], as_tuple=True)  # grouped by fresh row
            counts = torch.bincount(which, minlength=len(fresh)).tolist()
            pieces = zip((images + s).int().split(counts), block[which, images].split(counts), strict=True)
            for r, (to, cosine) in zip(fresh, pieces, strict=True):  # copies: an evicted row frees its memory
                entries[r].append((to.clone(), cosine.clone()))
        self.density = max(sum(_pairs(entries[r]) for r in fresh) / (len(fresh) * len(nearest)), 1e-3)
        for r in [row] + [r for r in ranked if r in entries]:  # best first, within the budget
            budget -= _pairs(entries[r])
            if budget < 0 and r != row:
                break
            self.entries[r] = entries[r]


def _pairs(entry: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """How many (image, cosine) pairs a :class:`_Cosines` entry holds."""
    return sum(len(images) for images, _ in entry)


class Attention(nn.Module):
    """Multi-head attention block (MAB of the Set Transformer): queries attend to keys, residual + feed-forward."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.feed = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.query(queries)), self._heads(self.key(keys)), self._heads(self.value(keys))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return self._finish(queries, weights @ v)

    def _heads(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, L, W) → (B, heads, L, W / heads)."""
        b, length, width = rows.shape[0], rows.shape[1], rows.shape[2]
        return rows.view(b, length, self.heads, width // self.heads).transpose(1, 2)

    def _finish(self, queries: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The heads' attended values (B, heads, Q, W / heads) merged, then residual + feed-forward."""
        b, q_len, width = queries.shape[0], queries.shape[1], queries.shape[2]
        hidden = self.norm1(queries + attended.transpose(1, 2).reshape(b, q_len, width))
        return self.norm2(hidden + self.feed(hidden))

    @torch.jit.unused
    def forward_in_chunks(self, queries: torch.Tensor, keys: torch.Tensor, chunk: int) -> torch.Tensor:
        """:meth:`forward` over ``chunk`` keys at a time (an online softmax): a few queries summarising a huge pool
        without (B, heads, Q, N) weights."""
        q = self._heads(self.query(queries)) / math.sqrt(queries.shape[-1] // self.heads)
        top = torch.full((*q.shape[:-1], 1), float("-inf"))
        total, attended = torch.zeros_like(top), torch.zeros_like(q)
        for start in range(0, keys.shape[1], chunk):
            part = keys[:, start : start + chunk]
            logits = q @ self._heads(self.key(part)).transpose(-1, -2)
            highest = torch.maximum(top, logits.amax(dim=-1, keepdim=True))
            weights, rescale = torch.exp(logits - highest), torch.exp(top - highest)
            total = total * rescale + weights.sum(dim=-1, keepdim=True)
            attended = attended * rescale + weights @ self._heads(self.value(part))
            top = highest
        return self._finish(queries, attended / total)


class InducedAttention(nn.Module):
    """ISAB: m learned points summarise the pool, then every image reads the summary (N·m attention)."""

    def __init__(self, width: int, heads: int, points: int):
        super().__init__()
        self.points = nn.Parameter(torch.randn(1, points, width) / math.sqrt(width))
        self.summarise = Attention(width, heads)
        self.read = Attention(width, heads)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        summary = self.summarise(self.points.expand(tokens.shape[0], -1, -1), tokens)
        return self.read(tokens, summary)


class SetPolicy(nn.Module):
    """``(B, N, D′)`` pool features, K → ``(B, N)`` scores (each image's logit when picked, else at the last step)
    and ``(B, K)`` picks in order. D′ = D, plus the metadata features the selector was trained with."""

    def __init__(
        self,
        embedding_dim: int,
        *,
        hidden: int = 64,
        metadata: int = 0,
        heads: int = 4,
        points: int = 16,
        read_embedding: bool = False,
    ):
        super().__init__()
        self.read_embedding = read_embedding  # also the embedding itself (what images look like), not only geometry
        self.embedding = nn.Linear(embedding_dim, hidden if read_embedding else 1)
        self.embedding_dim, self.hidden = embedding_dim, hidden
        self.input_dim = embedding_dim + metadata
        self.anchors, self.temperature = ANCHORS, TEMPERATURE  # attributes: TorchScript reads no module globals
        self.tokens = nn.Sequential(
            nn.Linear(GEOMETRY_FEATURES + metadata, hidden), nn.ReLU(), nn.Linear(hidden, hidden)
        )
        self.layers = nn.ModuleList([InducedAttention(hidden, heads, points) for _ in range(2)])
        self.step = nn.Sequential(nn.Linear(hidden + STEP_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def encode(self, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image: its context vector (B, N, H), raw embedding (B, N, D) with its inverse norm (B, N) — unit rows
        as matrix products of the two, never held (a million 512-d rows are 2 GB) — and soft cluster weights
        (B, N, m)."""
        raw = pool[:, :, : self.embedding_dim]
        norm = torch.linalg.vector_norm(raw, dim=-1).clamp_min(1e-12)
        inverse = 1.0 / norm
        direction = torch.bmm(inverse.unsqueeze(1), raw) / raw.shape[1]  # the mean unit row
        direction = direction / torch.linalg.vector_norm(direction, dim=-1, keepdim=True).clamp_min(1e-12)
        centrality = _dot(raw, direction) * inverse
        mean = raw.mean(dim=1, keepdim=True)  # distance to it expanded, so no (N, D) difference is held
        spread = (norm**2 - 2 * _dot(raw, mean) + (mean * mean).sum(-1)).clamp_min(0).sqrt()
        anchors = self._anchors(raw, inverse, centrality)
        similarity = torch.bmm(raw, anchors.transpose(1, 2)) * inverse.unsqueeze(-1)
        assign = torch.softmax(similarity / self.temperature, dim=-1)
        mass = assign.mean(dim=1, keepdim=True)
        centroids = torch.bmm((assign * inverse.unsqueeze(-1)).transpose(1, 2), raw)
        centroids = centroids / torch.linalg.vector_norm(centroids, dim=-1, keepdim=True).clamp_min(1e-12)
        share = (assign * mass).sum(-1)
        typicality = (assign * torch.bmm(raw, centroids.transpose(1, 2)) * inverse.unsqueeze(-1)).sum(-1)
        geometry = torch.stack([norm.log(), centrality, spread, share, typicality, similarity.max(dim=-1)[0]], dim=-1)
        features = torch.cat([_standardise(geometry), pool[:, :, self.embedding_dim :]], dim=-1)
        context = self.tokens(features)
        if self.read_embedding:  # the unit row centred on the pool, scaled to components of order 1, as MedSelect
            # reads it; the layer is linear, so centre its output: no centred (N, D) copy
            projected = nn.functional.linear(raw, self.embedding.weight) * inverse.unsqueeze(-1)
            centred = projected - projected.mean(dim=1, keepdim=True)
            context = context + centred * math.sqrt(self.embedding_dim) + self.embedding.bias
        for layer in self.layers:
            context = layer(context)
        return context, raw, inverse, assign

    def _anchors(self, raw: torch.Tensor, inverse: torch.Tensor, centrality: torch.Tensor) -> torch.Tensor:
        """Farthest-point sampling from the most central image: an order-free, deterministic cover of the pool."""
        index = torch.argmax(centrality, dim=1)
        chosen = _unit_rows(raw, inverse, index)
        anchors = [chosen]
        nearest = _dot(raw, chosen) * inverse
        for _ in range(min(self.anchors, raw.shape[1]) - 1):  # a pool smaller than m: each image once
            index = torch.argmin(nearest, dim=1)
            chosen = _unit_rows(raw, inverse, index)
            anchors.append(chosen)
            nearest = torch.maximum(nearest, _dot(raw, chosen) * inverse)
        return torch.cat(anchors, dim=1)

    def context_logits(self, context: torch.Tensor) -> torch.Tensor:
        """The part of the step layer's first linear map that reads the context: the same at every step, so it is
        computed once (the layer is linear in [context, step features])."""
        first = self.step[0]
        return nn.functional.linear(context, first.weight[:, : self.hidden], first.bias)

    def logits(self, base: torch.Tensor, nearest: torch.Tensor, covered: torch.Tensor, fraction: float) -> torch.Tensor:
        """Every image's logit for the next pick, given :meth:`context_logits` and the picks so far (``nearest``:
        cosine to the closest pick; ``covered``: how much of its soft cluster is picked)."""
        return self._step_logits(base, self._step_features(nearest, covered, fraction))

    def _step_features(self, nearest: torch.Tensor, covered: torch.Tensor, fraction: float) -> torch.Tensor:
        """(B, N, 3): k-center gain and cluster already picked, each z-scored over the pool, and the share of K."""
        gain = _standardise(1.0 - nearest)
        return torch.stack([gain, _standardise(covered), torch.full_like(gain, fraction)], dim=-1)

    def _step_logits(self, base: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Per image: the step layer on its context part (``base``) and its step features. Row by row."""
        first = self.step[0]
        hidden = torch.relu(base + nn.functional.linear(step, first.weight[:, self.hidden :]))
        return self.step[2](hidden).squeeze(-1)

    def forward(self, pool: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context, raw, inverse, assign = self.encode(pool)
        base = self.context_logits(context)
        b, n = raw.shape[0], raw.shape[1]
        picks_wanted = min(int(k), n)
        nearest = torch.zeros(b, n)
        covered = torch.zeros(b, n)
        taken = torch.zeros(b, n, dtype=torch.bool)
        scores = torch.zeros(b, n)
        picks = torch.zeros(b, picks_wanted, dtype=torch.long)
        for t in range(picks_wanted):
            logits = self.logits(base, nearest, covered, t / max(picks_wanted, 1))
            scores = torch.where(taken, scores, logits)
            best = torch.argmax(logits.masked_fill(taken, float("-inf")), dim=1)
            picks[:, t] = best
            taken = taken.scatter(1, best.unsqueeze(1), True)
            nearest = torch.maximum(nearest, _dot(raw, _unit_rows(raw, inverse, best)) * inverse)
            covered = covered + _dot(assign, assign.gather(1, best.view(b, 1, 1).expand(b, 1, assign.shape[2])))
        return scores, picks

    @torch.jit.unused
    def forward_in_chunks(
        self, pool: torch.Tensor, k: int, chunk: int = CHUNK_ROWS
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` of one large pool ``(N, D′)`` → ``(N,)`` scores and ``(K,)`` picks, encoded ``chunk`` rows
        at a time (the steps: ``STEP_ROWS``): the same computation (float rounding aside; tested) without forward's
        (N, ·) activations of every layer at once, which a million-image pool holds at several times its embeddings'
        size."""
        spans = [(start, min(start + chunk, pool.shape[0])) for start in range(0, pool.shape[0], chunk)]
        base, raw, inverse, assign = self._encode_in_chunks(pool, spans)
        return self._pick_in_chunks(base, raw, inverse, assign, min(k, pool.shape[0]))

    @torch.jit.unused
    def _encode_in_chunks(
        self, pool: torch.Tensor, spans: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`encode` then :meth:`context_logits`, chunk by chunk: passes over the rows gather the pool's
        statistics first (mean direction, anchors, cluster mass and centroids, the summaries of the attention
        layers — an online softmax), then each chunk is computed from them."""
        n, d, chunk = pool.shape[0], self.embedding_dim, spans[0][1] - spans[0][0]
        raw = pool[:, :d]

        def each(compute) -> torch.Tensor:
            return _by_chunk(spans, compute)

        inverse = each(lambda s, e: 1.0 / torch.linalg.vector_norm(raw[s:e], dim=-1).clamp_min(1e-12))

        rows = raw.numpy()  # matrix-vector products by numpy's BLAS: 2.3× torch's on this CPU at 10⁶ rows

        def cosine(unit: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(rows @ unit.numpy()) * inverse

        unit_mean = sum(inverse[s:e] @ raw[s:e] for s, e in spans) / n
        centrality = cosine(unit_mean / torch.linalg.vector_norm(unit_mean).clamp_min(1e-12))
        mean = sum(raw[s:e].sum(dim=0) for s, e in spans) / n
        spread = (inverse**-2 - 2 * each(lambda s, e: raw[s:e] @ mean) + mean @ mean).clamp_min(0).sqrt()
        index = int(torch.argmax(centrality))
        anchors = [raw[index] * inverse[index]]
        nearest = cosine(anchors[0])
        for _ in range(min(self.anchors, n) - 1):
            index = int(torch.argmin(nearest))
            anchors.append(raw[index] * inverse[index])
            nearest = torch.maximum(nearest, cosine(anchors[-1]))
        assign, clusters = self._soft_clusters(raw, inverse, torch.stack(anchors), spans)
        geometry = torch.cat([torch.stack([-inverse.log(), centrality, spread], -1), clusters], -1)
        features = torch.cat([_standardise(geometry[None])[0], pool[:, d:]], dim=-1)

        def context_of(s: int, e: int) -> torch.Tensor:  # encode()'s context, chunk by chunk (parity test: chunked)
            context = self.tokens(features[s:e])
            if self.read_embedding:  # the projection's pool mean is the projection of the mean unit row
                projected_mean = nn.functional.linear(unit_mean, self.embedding.weight)
                projected = nn.functional.linear(raw[s:e], self.embedding.weight) * inverse[s:e, None]
                context = context + (projected - projected_mean) * math.sqrt(d) + self.embedding.bias
            return context

        context = each(context_of)
        for layer in self.layers:
            summary = layer.summarise.forward_in_chunks(layer.points, context[None], chunk)
            for s, e in spans:
                context[s:e] = layer.read(context[None, s:e], summary)[0]
        for s, e in spans:  # the step layer's context part, in place
            context[s:e] = self.context_logits(context[s:e])
        return context, raw, inverse, assign

    @torch.jit.unused
    def _soft_clusters(
        self, raw: torch.Tensor, inverse: torch.Tensor, anchors: torch.Tensor, spans: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """encode()'s soft clustering of a large pool, chunk by chunk: the assignments as columns (m, N) — the steps'
        coverage product is 1.8× faster so — and per image its cluster share, typicality and nearest anchor's
        cosine (N, 3). The (N, m) similarities are never held beside the assignments."""

        def assigned(s: int, e: int) -> torch.Tensor:  # per image: its soft assignment, then its nearest anchor
            similarity = (raw[s:e] @ anchors.T) * inverse[s:e, None]
            soft = torch.softmax(similarity / self.temperature, dim=-1)
            return torch.cat([soft, similarity.amax(dim=-1, keepdim=True)], dim=-1)

        both = _by_chunk(spans, assigned)
        assign, nearest_anchor = both[:, :-1], both[:, -1]
        centroids = sum((assign[s:e] * inverse[s:e, None]).T @ raw[s:e] for s, e in spans)
        centroids = centroids / torch.linalg.vector_norm(centroids, dim=-1, keepdim=True).clamp_min(1e-12)
        share = assign @ assign.mean(dim=0)

        def typical(s: int, e: int) -> torch.Tensor:  # cosine to the centroids, weighted by the soft assignment
            return (assign[s:e] * (raw[s:e] @ centroids.T) * inverse[s:e, None]).sum(-1)

        typicality = _by_chunk(spans, typical)
        return assign.T.contiguous(), torch.stack([share, typicality, nearest_anchor], dim=-1)

    @torch.jit.unused
    def _pick_in_chunks(
        self, base: torch.Tensor, raw: torch.Tensor, inverse: torch.Tensor, assign: torch.Tensor, wanted: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward's K steps over a large pool, given :meth:`context_logits` (``base``) and the soft assignments as
        columns (``assign``, (m, N)). Each step is one product over the pool for the coverage and one pass over
        chunks of ``STEP_ROWS`` rows of ``base``; the rest is made cheaper than forward's, not different (each pick
        is the argmax of the same logits):

        - The step features' z-scores come from running sums, not passes: the k-center gain's from the sums of
          ``nearest`` (updated on the images a pick moves), the cluster coverage's in closed form — an image's
          coverage is its soft assignment · the picks' summed assignments ``picked``, so the pool's sum and sum of
          squares are ``mass · picked`` and ``pickedᵀ G picked`` with G the assignments' Gram matrix. Each z-score
          is an affine map of the raw value, so it folds into the step layer's weights: per chunk, one ``addmm``
          of [nearest, coverage, 1] into a reused buffer. The last layer's bias, the same for every image, is
          added to the scores only.
        - A pick's cosines to every image (2 GB read at 10⁶ × 512) come from :class:`_Cosines`, computed for a few
          likely next picks at a time."""
        n, hidden_width = raw.shape[0], self.hidden
        if wanted == 0:  # as forward: no picks, every score 0
            return torch.zeros(n), torch.zeros(0, dtype=torch.long)
        spans = [(start, min(start + STEP_ROWS, n)) for start in range(0, n, STEP_ROWS)]
        first, last = self.step[0], self.step[2]
        gain_weight, cover_weight, fraction_weight = (first.weight[:, hidden_width + i].detach() for i in range(3))
        last_weight, last_bias = last.weight[0].detach(), float(last.bias)
        gram = sum(assign[:, s:e].double() @ assign[:, s:e].T.double() for s, e in spans)
        mass = sum(assign[:, s:e].double().sum(dim=1) for s, e in spans)  # by chunk: no float64 copy of the whole
        picked = torch.zeros(assign.shape[0], dtype=torch.float64)
        inputs = torch.ones(3, n)  # [nearest, coverage, 1] per image, as rows: the step layer's input
        nearest, cosines = inputs[0].zero_(), _Cosines(raw, inverse, spans)
        nearest_sum = nearest_squares = 0.0  # float64 sums of nearest over the pool
        weights = torch.empty(3, hidden_width)
        hidden, logits = torch.empty(min(STEP_ROWS, n), hidden_width), torch.zeros(n)
        picks, picked_logits = [], []
        for t in range(wanted):
            # z-scores as _standardise computes them, from the sums; folded: z = raw · scale + shift
            gain_scale, gain_shift = _z_map(1.0 - nearest_sum / n, nearest_squares / n - (nearest_sum / n) ** 2)
            gain_shift, gain_scale = gain_shift + gain_scale, -gain_scale  # gain = 1 − nearest
            cover_mean = float(mass @ picked) / n
            cover_scale, cover_shift = _z_map(cover_mean, float(picked @ gram @ picked) / n - cover_mean**2)
            weights[0] = gain_weight * gain_scale
            weights[1] = cover_weight * cover_scale
            weights[2] = gain_weight * gain_shift + cover_weight * cover_shift + fraction_weight * (t / wanted)
            torch.mv(assign.T, picked.float(), out=inputs[1])
            for s, e in spans:
                torch.addmm(base[s:e], inputs[:, s:e].T, weights, out=hidden[: e - s]).relu_()
                torch.mv(hidden[: e - s], last_weight, out=logits[s:e])
            logits[torch.tensor(picks, dtype=torch.long)] = float("-inf")
            best = int(torch.argmax(logits))
            picks.append(best)
            picked_logits.append(float(logits[best]))
            logits[best] = float("-inf")
            before, after = (values.double() for values in cosines.raise_nearest(nearest, best, logits))
            nearest_sum += float((after - before).sum())
            nearest_squares += float((after * after - before * before).sum())
            picked += assign[:, best].double()
        scores = logits + last_bias  # each row's logit at the last step, or at its pick
        scores[torch.tensor(picks, dtype=torch.long)] = torch.tensor(picked_logits) + last_bias
        return scores, torch.tensor(picks, dtype=torch.long)

    @torch.jit.unused
    def sample(self, pool: torch.Tensor, k: int, samples: int, generator: torch.Generator):
        """``samples`` sequences of K picks per pool, each step drawn from the softmax over the unpicked images;
        returns picks (B·samples, K) and the log-probability of each sequence (B·samples,)."""
        return self._walk(pool, k, samples, generator, None)

    @torch.jit.unused
    def log_prob(self, pool: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
        """The log-probability (B,) of given ordered picks (B, K), e.g. a teacher's: what imitation maximises."""
        return self._walk(pool, picks.shape[1], 1, None, picks)[1]

    @torch.jit.unused
    def _walk(self, pool, k: int, samples: int, generator, forced):
        """K steps over each pool's softmax: sampled with ``generator``, or the ``forced`` picks (teacher forcing)."""
        context, raw, inverse, assign = (t.repeat_interleave(samples, dim=0) for t in self.encode(pool))
        base = self.context_logits(context)
        b, n = raw.shape[0], raw.shape[1]
        nearest, covered = torch.zeros(b, n), torch.zeros(b, n)
        taken = torch.zeros(b, n, dtype=torch.bool)
        picks, log_prob = [], torch.zeros(b)
        rows = torch.arange(b)
        for t in range(k):
            logits = self.logits(base, nearest, covered, t / k).masked_fill(taken, float("-inf"))
            if forced is None:
                uniform = torch.rand(logits.shape, generator=generator).clamp(1e-10, 1 - 1e-7)
                best = torch.argmax(logits.detach() - torch.log(-torch.log(uniform)), dim=1)
            else:
                best = forced[:, t]
            log_prob = log_prob + torch.log_softmax(logits, dim=1)[rows, best]
            picks.append(best)
            taken = taken.scatter(1, best.unsqueeze(1), True)
            with torch.no_grad():
                nearest = torch.maximum(nearest, _dot(raw, _unit_rows(raw, inverse, best)) * inverse)
                covered = covered + _dot(assign, assign[rows, best].unsqueeze(1))
        return torch.stack(picks, dim=1), log_prob
