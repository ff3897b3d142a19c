"""The loss names listed in docs/losses*.md are exported, and every loss module cites its paper."""
import importlib
import pkgutil

import losses

TABLE = ["mw_loss", "auc", "multi_similarity_loss", "multi_similarity_miner", "proto_triplet_loss", "icnn_loss",
         "soft_sort", "diffsort_permutation", "groco_loss", "dual_head_kd_loss", "pld_loss", "unpg_loss", "anyloss",
         "lol_regularizer", "deqa_soft_labels", "fidelity_loss", "fedld_margin_loss", "principal_gradient_aggregate",
         "grpo_advantages", "unlikeliness_reward", "dpo_loss", "ranking_accuracy", "idealized_ranking_accuracy",
         "e2rank_loss", "curriculum_weights", "sft_cl_decomposition",
         "amcl_loss", "amcl_simclr_loss", "amcl_symnegcos_loss", "amcl_barlow_twins_loss", "amcl_omega",
         "amcl_temperature", "amcl_temperature_init", "rep_mtl_task_saliency", "rep_mtl_tsr_loss",
         "rep_mtl_csa_loss", "rep_mtl_loss", "tr2m_coarse_loss", "tr2m_fine_loss", "tr2m_soc_loss",
         "tr2m_pseudo_scale", "tr2m_depth_classes", "tr2m_ema", "ast_loss_scale", "ast_gradient_penalty",
         "ast_expert_loss", "ast_balance_factor", "ast_unroll", "ast_trajectory_loss", "ast_matching_loss",
         "ast_middle_weights", "ast_record_steps"]


def test_table_names_exported_and_documented():
  for name in TABLE:
    fn = getattr(losses, name)
    assert callable(fn) and fn.__doc__, name
    assert name in losses.__all__


def test_modules_cite_paper():
  for mod in pkgutil.iter_modules(losses.__path__):
    if mod.name.startswith("_"):
      continue
    doc = importlib.import_module(f"losses.{mod.name}").__doc__
    assert doc and "arXiv:" in doc, mod.name
