"""ptcore's ops: PyTorch-style functional ops, each dispatched to a backend (see dispatch.py)."""
from ptcore.ops.advantages import gae, group_advantages
from ptcore.ops.backbone import geglu, rms_norm, rope, swiglu
from ptcore.ops.logits_budget import chunk_budget
from ptcore.ops.cross_entropy import linear_cross_entropy
from ptcore.ops.dispatch import BACKENDS, BackendUnavailable, use_backend
from ptcore.ops.fused_dpo import linear_dpo_loss
from ptcore.ops.fused_policy import linear_policy_loss
from ptcore.ops.logprobs import linear_logprobs
from ptcore.ops.paged_attention import copy_pages, paged_attention_decode, paged_attention_extend, write_kv
from ptcore.ops.policy import kl_penalty, policy_loss
from ptcore.ops.preference import dpo_loss
from ptcore.ops.speculative import speculative_verify, speculative_verify_tree

__all__ = ["BACKENDS", "BackendUnavailable", "chunk_budget", "dpo_loss", "gae", "group_advantages",
           "kl_penalty", "linear_cross_entropy", "linear_dpo_loss", "linear_logprobs", "linear_policy_loss",
           "policy_loss", "use_backend"]
__all__ += ["copy_pages", "paged_attention_decode", "paged_attention_extend", "write_kv"]
__all__ += ["speculative_verify", "speculative_verify_tree"]
__all__ += ["geglu", "rms_norm", "rope", "swiglu"]
