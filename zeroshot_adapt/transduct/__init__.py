"""Training-free transduction on the teacher's cached predictions (REFERENCE.md section 6).

Each method refines class probabilities [N, C] using, where needed, the cached image features and the
text classifier; methods compose in order (``label-propagation,sinkhorn``). Importing this package
registers every method in :data:`METHODS`.

    zeroshot           CLIP's probabilities, unchanged
    debias             divide by the predicted class marginal (DebiasPL eq. 3, post hoc)
    prior-em           EM estimate of the class prior (Saerens et al. 2002)
    sinkhorn           rebalance to a class marginal by Sinkhorn optimal transport (OTTER)
    label-propagation  kNN-graph propagation of the predictions (Zhou et al. 2004; ZLaP)
    transclip          GMM + Laplacian + text KL, block majorise-minimise (TransCLIP)
"""

from zeroshot_adapt.transduct import debias, label_propagation, prior_em, sinkhorn, transclip, zeroshot  # noqa: F401
from zeroshot_adapt.transduct.base import (
    METHODS,
    FeatureSource,
    TransductInputs,
    TransductMethod,
    chain_name,
    parse_chain,
)
from zeroshot_adapt.transduct.compose import Refinement, chain_identity, refine
from zeroshot_adapt.transduct.knn import KnnGraph, KnnSettings, knn_graph

__all__ = [
    "METHODS",
    "FeatureSource",
    "KnnGraph",
    "KnnSettings",
    "Refinement",
    "TransductInputs",
    "TransductMethod",
    "chain_identity",
    "chain_name",
    "knn_graph",
    "parse_chain",
    "refine",
]
