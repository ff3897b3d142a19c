"""lostjax loss library: the seed papers' losses as pure, jit/grad/vmap-safe JAX functions.

One module per paper; see each module docstring for the paper, equations and deviations from the
reference code. All functions take arrays (plus static hyperparameters) and return arrays.
"""
from losses.amcl import (amcl_barlow_twins_loss, amcl_loss, amcl_omega, amcl_simclr_loss, amcl_symnegcos_loss,
                         amcl_temperature, amcl_temperature_init)
from losses.anyloss import anyloss
from losses.ast import (ast_balance_factor, ast_expert_loss, ast_gradient_penalty, ast_loss_scale,
                        ast_matching_loss, ast_middle_weights, ast_record_steps, ast_trajectory_loss, ast_unroll)
from losses.curriculum import (curriculum_weighted_loss, curriculum_weights, kde_difficulty,
                               normscore_difficulty, reciprank_difficulty)
from losses.deqa import deqa_score, deqa_soft_labels, deqa_softkl_loss, fidelity_loss
from losses.dhkd import (binary_kl_loss, binary_kl_norm_loss, dual_head_kd_loss, gradient_alignment,
                         kd_loss)
from losses.e2rank import e2rank_infonce_loss, e2rank_loss, e2rank_ranknet_loss
from losses.fedld import fedld_margin_loss, principal_gradient_aggregate
from losses.groco import diffsort_permutation, groco_loss, groco_sorting_loss, soft_sort
from losses.healthivert import healthivert_generator_loss
from losses.icnn import icnn_loss, icnn_score, proto_triplet_loss
from losses.lol import lol_reformulation_loss, lol_regularizer
from losses.multi_similarity import multi_similarity_loss, multi_similarity_miner
from losses.mw import auc, mw_loss
from losses.pirads import (pirads_consistency_loss, pirads_dice_loss, pirads_dual_path_loss, pirads_sdm_loss,
                           pirads_soft_dice)
from losses.pld import pld_loss
from losses.ranking_accuracy import dpo_loss, idealized_ranking_accuracy, ranking_accuracy
from losses.rep_mtl import rep_mtl_csa_loss, rep_mtl_loss, rep_mtl_task_saliency, rep_mtl_tsr_loss
from losses.sft_cl import cl_loss, sft_cl_decomposition, sft_loss, unified_reranking_loss
from losses.tr2m import (tr2m_coarse_loss, tr2m_depth_classes, tr2m_ema, tr2m_fine_loss, tr2m_pseudo_scale,
                          tr2m_soc_loss)
from losses.unlikeliness import grpo_advantages, unlikeliness_reward
from losses.unpg import unpg_loss

__all__ = [
    "amcl_barlow_twins_loss", "amcl_loss", "amcl_omega", "amcl_simclr_loss", "amcl_symnegcos_loss",
    "amcl_temperature", "amcl_temperature_init", "ast_balance_factor", "ast_expert_loss", "ast_gradient_penalty",
    "ast_loss_scale", "ast_matching_loss", "ast_middle_weights", "ast_record_steps", "ast_trajectory_loss",
    "ast_unroll",
    "anyloss", "auc", "binary_kl_loss", "binary_kl_norm_loss", "cl_loss", "curriculum_weighted_loss",
    "curriculum_weights", "deqa_score", "deqa_soft_labels", "deqa_softkl_loss", "diffsort_permutation",
    "dpo_loss", "dual_head_kd_loss", "e2rank_infonce_loss", "e2rank_loss", "e2rank_ranknet_loss",
    "fedld_margin_loss", "fidelity_loss", "gradient_alignment", "groco_loss", "groco_sorting_loss",
    "grpo_advantages", "healthivert_generator_loss", "icnn_loss", "icnn_score", "idealized_ranking_accuracy",
    "kd_loss",
    "kde_difficulty", "lol_reformulation_loss", "lol_regularizer", "multi_similarity_loss",
    "multi_similarity_miner", "mw_loss", "normscore_difficulty", "pirads_consistency_loss", "pirads_dice_loss",
    "pirads_dual_path_loss", "pirads_sdm_loss", "pirads_soft_dice", "pld_loss", "principal_gradient_aggregate",
    "proto_triplet_loss", "ranking_accuracy", "reciprank_difficulty", "rep_mtl_csa_loss", "rep_mtl_loss",
    "rep_mtl_task_saliency", "rep_mtl_tsr_loss", "sft_cl_decomposition", "sft_loss",
    "soft_sort", "tr2m_coarse_loss", "tr2m_depth_classes", "tr2m_ema", "tr2m_fine_loss",
    "tr2m_pseudo_scale", "tr2m_soc_loss", "unified_reranking_loss", "unlikeliness_reward", "unpg_loss",
]
