"""Choosing k of n examples: by a score, or for diversity over their embeddings.

Each rule returns a `Choice`: the chosen indices in the order the rule chose
them, and per-example fields for the scores JSONL. Deterministic: ties go to
the lower index, random draws come from `numpy.random.default_rng(seed)`.

  top_k             the k highest (or lowest) finite scores: loss / perplexity.
  top_k_ifd         Cherry LLM's rule for IFD (Li et al., NAACL 2024, §2.3 and
                    their released selection script): examples with IFD > 1
                    (the instruction does not help predict the answer) are
                    dropped, then the k highest IFD; fewer than k when fewer
                    remain.
  k_center_greedy   farthest-first traversal (Gonzalez 1985; the k-Center-Greedy
                    of Sener & Savarese, "Active Learning for Convolutional Neural
                    Networks: A Core-Set Approach", ICLR 2018, Algorithm 1),
                    starting from the example nearest the embeddings' mean.
                    Its picks are nested: the first k of a larger run.
  k_means_quota     Yu et al., "Diversify and Conquer: Diversity-Centric Data
                    Selection with Iterative Refinement" (2024), k-means
                    sampling (their kM-Random, §3): scikit-learn's KMeans into
                    `num_clusters` clusters, each cluster given a share of k
                    proportional to its size (largest remainders), filled in a
                    seeded random order within the cluster.
  uniform_random    k examples uniformly at random (the baseline).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from sklearn import cluster


@dataclasses.dataclass
class Choice:
  """Chosen indices (int64 [m], m <= k, in the rule's order) and per-example fields
  ({name: array [n]}) written beside the scores."""
  indices: np.ndarray
  fields: dict[str, np.ndarray]


def _ordered(keys: np.ndarray, eligible: np.ndarray, k: int) -> np.ndarray:
  """The first k eligible indices by ascending key, ties to the lower index."""
  candidates = np.flatnonzero(eligible)
  order = np.lexsort((candidates, keys[candidates]))  # Last key is primary.
  return candidates[order][:k].astype(np.int64)


def top_k(scores: np.ndarray, k: int, highest: bool = True) -> Choice:
  """The k examples with the highest (lowest) finite score; NaN is never chosen."""
  scores = np.asarray(scores, np.float64)
  eligible = np.isfinite(scores)
  return Choice(_ordered(-scores if highest else scores, eligible, k), {})


def top_k_ifd(ifd: np.ndarray, k: int, highest: bool = True) -> Choice:
  """Among examples with a finite IFD <= 1, the k with the highest (lowest) IFD."""
  ifd = np.asarray(ifd, np.float64)
  eligible = np.isfinite(ifd) & (ifd <= 1.0)
  return Choice(_ordered(-ifd if highest else ifd, eligible, k), {"ifd_eligible": eligible})


def k_center_greedy(embeddings: np.ndarray, k: int) -> Choice:
  """k centers by farthest-first traversal in float64 Euclidean distance.

  The first center is the example nearest the embeddings' mean (ties: the lower
  index); each next one is the example farthest from its nearest center.
  Fields: `kcenter_distance`, float64 [n]: for a chosen example its distance to
  the nearest earlier center when it was chosen (inf for the first), for the
  others their distance to the nearest center at the end. The chosen distances
  never increase along the order and no unchosen example lies farther than the
  last one chosen, so the chosen are the k largest (ties: the order).
  """
  points = np.asarray(embeddings, np.float64)
  count = len(points)
  if not 0 < k <= count:
    raise ValueError(f"k must be in [1, {count}], got {k}")
  squares = np.einsum("ne,ne->n", points, points)

  def squared_distances(center: np.ndarray) -> np.ndarray:
    # |x|^2 + |c|^2 - 2 x.c: one matrix-vector product per center, no [n, embed] temporary.
    return squares + center @ center - 2 * points @ center

  picked = np.empty(k, np.int64)
  at_pick = np.empty(k, np.float64)
  picked[0], at_pick[0] = int(np.argmin(squared_distances(points.mean(0)))), np.inf
  nearest = squared_distances(points[picked[0]])
  nearest[picked[0]] = -np.inf  # Chosen: -inf stays below every distance under minimum.
  for step in range(1, k):
    index = int(np.argmax(nearest))  # argmax: the lowest index among ties.
    picked[step], at_pick[step] = index, np.sqrt(max(nearest[index], 0.0))
    nearest = np.minimum(nearest, squared_distances(points[index]))
    nearest[index] = -np.inf
  distance = np.sqrt(np.maximum(nearest, 0.0))
  distance[picked] = at_pick
  return Choice(picked, {"kcenter_distance": distance})


def _quotas(sizes: np.ndarray, k: int) -> np.ndarray:
  """int64 [clusters]: k split proportionally to `sizes` by largest remainders (ties to
  the lower cluster), never more than a cluster holds."""
  exact = sizes * (k / sizes.sum())
  quotas = np.floor(exact).astype(np.int64)
  remainders = exact - quotas
  for index in np.lexsort((np.arange(len(sizes)), -remainders)):
    if quotas.sum() >= k:
      break
    if quotas[index] < sizes[index]:
      quotas[index] += 1
  return quotas


def k_means_quota(embeddings: np.ndarray, k: int, num_clusters: int, seed: int) -> Choice:
  """k examples spread over k-means clusters in proportion to their sizes.

  Fields: `cluster` (int64 [n], the k-means label) and `cluster_rank` (int64
  [n], the example's place in its cluster's seeded random order; those below the
  cluster's quota are chosen). The order interleaves the clusters: rank 0 of
  every cluster, then rank 1, ...
  """
  points = np.asarray(embeddings, np.float32)
  count = len(points)
  if not 0 < k <= count:
    raise ValueError(f"k must be in [1, {count}], got {k}")
  clusters = min(num_clusters, count)
  kmeans = cluster.KMeans(n_clusters=clusters, n_init=1, random_state=seed).fit(points)
  labels = kmeans.labels_.astype(np.int64)
  sizes = np.bincount(labels, minlength=clusters)
  quotas = _quotas(sizes, k)
  draw = np.random.default_rng(seed).random(count)
  ranks = np.empty(count, np.int64)
  for label in range(clusters):
    members = np.flatnonzero(labels == label)
    ranks[members[np.lexsort((members, draw[members]))]] = np.arange(len(members))
  chosen = ranks < quotas[labels]
  indices = _ordered(ranks * clusters + labels, chosen, k)
  return Choice(indices, {"cluster": labels, "cluster_rank": ranks})


def uniform_random(count: int, k: int, seed: int) -> Choice:
  """k of `count` examples uniformly at random: the k lowest of a seeded uniform draw.

  Fields: `draw`, float64 [count], the draw."""
  draw = np.random.default_rng(seed).random(count)
  return Choice(_ordered(draw, np.ones(count, bool), k), {"draw": draw})
