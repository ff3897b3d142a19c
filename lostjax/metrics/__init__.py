"""Analysis metrics: RankMe, layer-wise gradient spectra, scaling-law fits, LLM Swiss round, retrieval and
robustness metrics, G-Rank, per-zone segmentation metrics (PI-RADS), geographic generalization metrics,
HealthiVert-GAN's RHLV and generation metrics, Grad-CAM++."""
from lostjax.metrics.geographic import (disparity, disparity_growth, disparity_reduction, group_accuracy,
                                        progress_gap, progress_rate, topk_set_correct)
from lostjax.metrics.grad_cam import grad_cam_plus_plus
from lostjax.metrics.gradient_spectra import gradient_spectra
from lostjax.metrics.grank import GRankConfig, grank_scenario, simulate_grank
from lostjax.metrics.healthivert import rhlv
from lostjax.metrics.rankme import rankme
from lostjax.metrics.retrieval import (average_precision, exact_knn, hit_rate, label_recall,
                                       majority_vote_accuracy, mrr, ndcg, popularity_score, synthetic_recall)
from lostjax.metrics.robustness import (attack_success_rate, ood_drop_rate, per_query_variance,
                                        perturbation_percentage, rank_boost, topk_boost_rate, worst_k_mean)
from lostjax.metrics.scaling_law import fit_scaling_law
from lostjax.metrics.segmentation import aggregate_cases, hd95, masd, ravd, surface_distances, zone_metrics
from lostjax.metrics.swiss_round import swiss_round
from lostjax.metrics.pathways import (levenshtein, mean_pathway_distance, pathway_consistency,
                                      pathway_distances, router_embeddings, sample_pathways)


__all__ = ["rankme", "gradient_spectra", "fit_scaling_law", "swiss_round",
           "synthetic_recall", "label_recall", "majority_vote_accuracy", "hit_rate", "popularity_score",
           "mrr", "ndcg", "average_precision", "exact_knn",
           "per_query_variance", "worst_k_mean", "ood_drop_rate", "attack_success_rate", "rank_boost",
           "topk_boost_rate", "perturbation_percentage",
           "simulate_grank", "GRankConfig", "grank_scenario",
           "sample_pathways", "levenshtein", "pathway_distances", "mean_pathway_distance",
           "pathway_consistency", "router_embeddings",
           "masd", "hd95", "ravd", "surface_distances", "zone_metrics", "aggregate_cases",
           "topk_set_correct", "group_accuracy", "disparity", "progress_rate", "progress_gap", "disparity_growth",
           "disparity_reduction", "rhlv", "grad_cam_plus_plus"]
