"""DebiasPL Fig. 5: are the classes CLIP rarely predicts crowded in feature space?

Per class, the centroid of the L2-normalised image features (re-normalised); for the most and the least
predicted classes, the cosine similarity of the centroid to its nearest other centroids (faiss exact
search). Classes are grouped by their true label where labels exist (the class's real images), else by
CLIP's prediction. Features are read in chunks (see ``FeatureSource``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from zeroshot_adapt.transduct.base import FeatureSource

NUM_RANKED_CLASSES = 10  # the 10 most and the 10 least predicted classes (paper Fig. 5)
NUM_NEIGHBOUR_CLASSES = 9  # their 9 nearest other centroids
CHUNK_MEMORY_MB = 256


def class_centroids(features: FeatureSource, groups: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(centroids float32 [C, D] L2-normalised, counts int64 [C]); groups: [N] class id per row (-1: skip)."""
    sums = np.zeros((num_classes, features.dim), dtype=np.float64)
    for start, chunk in features.chunks(features.chunk_rows(CHUNK_MEMORY_MB)):
        block = groups[start : start + len(chunk)]
        keep = block >= 0
        np.add.at(sums, block[keep], chunk[keep].astype(np.float64))
    counts = np.bincount(groups[groups >= 0], minlength=num_classes).astype(np.int64)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return (sums / np.where(norms > 0, norms, 1.0)).astype(np.float32), counts


def centroid_neighbours(
    features: FeatureSource,
    groups: np.ndarray,
    prediction_counts: np.ndarray,
    class_names: list[str],
    *,
    grouping: str,
    num_ranked: int = NUM_RANKED_CLASSES,
    num_neighbours: int = NUM_NEIGHBOUR_CLASSES,
) -> dict[str, Any]:
    """The Fig. 5 record. prediction_counts: [C] zero-shot predictions per class (what ranks the classes).
    With fewer than 2 x num_ranked classes, each group takes half of them (no class is in both).

    Returns {"grouping", "num_neighbours", "most_predicted": [...], "least_predicted": [...],
    "mean_similarity": {"most_predicted", "least_predicted"}}; each class entry has index, name,
    predicted, samples, neighbours (names), similarities (descending). Classes without samples are left out."""
    import faiss

    num_classes = len(class_names)
    centroids, counts = class_centroids(features, groups, num_classes)
    present = np.flatnonzero(counts > 0)
    k = min(num_neighbours, len(present) - 1)
    record: dict[str, Any] = {"grouping": grouping, "num_neighbours": k, "most_predicted": [],
                              "least_predicted": [], "mean_similarity": {}}
    if k < 1:
        return record
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids[present]))
    similarities, found = index.search(np.ascontiguousarray(centroids[present]), k + 1)
    order = np.argsort(-prediction_counts[present], kind="stable")  # most predicted first
    ranked = max(1, min(num_ranked, len(present) // 2))  # the two groups never overlap (5 + 5 of 10 classes)
    for key, positions in (("most_predicted", order[:ranked]), ("least_predicted", order[::-1][:ranked])):
        for position in positions:
            others = [(s, int(present[j])) for s, j in zip(similarities[position], found[position], strict=True)
                      if j >= 0 and j != position][:k]
            cls = int(present[position])
            record[key].append({
                "index": cls, "name": class_names[cls], "predicted": int(prediction_counts[cls]),
                "samples": int(counts[cls]), "neighbours": [class_names[j] for _, j in others],
                "similarities": [round(float(s), 6) for s, _ in others],
            })
        values = [s for entry in record[key] for s in entry["similarities"]]
        record["mean_similarity"][key] = float(np.mean(values)) if values else None
    return record
