"""``IHActivationCache``: TransformerLens's ``ActivationCache`` with clear errors where IHTransformer differs.

IHTransformer has no residual stream: the copier hands per-head copies to the selector, the selector hands
a kernel to the classifier, and the classifier outputs probabilities. So TransformerLens names that live on
a residual stream (``resid_pre``, ``resid_mid``, ``attn_out``, ``mlp_out``, ``hook_q``/``hook_k``, layer
norms) and the cache methods that decompose one (``accumulated_resid``, ``stack_head_results``, ...) have
nothing to read. Looking one up raises an error that names the missing activation, says why, and points to
what to use instead; everything else behaves exactly as TransformerLens's cache.
"""

from __future__ import annotations

from typing import Any

from transformer_lens import ActivationCache
from transformer_lens.utilities import get_act_name

STAGE_HINT = (
    "patch IHTransformer by stage with ih_circuits.get_act_patch_stage_out (embedding, copier, selector and "
    "classifier outputs by position), or by head with transformer_lens.patching.get_act_patch_attn_head_"
    "{out,pattern,v}_{all_pos,by_pos}"
)
RESIDUAL_METHODS = (
    "accumulated_resid",
    "decompose_resid",
    "get_full_resid_decomposition",
    "stack_head_results",
    "compute_head_results",
    "apply_ln_to_stack",
    "logit_attrs",
    "logit_lens",
    "get_neuron_results",
    "stack_neuron_results",
)


class IHActivationCache(ActivationCache):
    """The ``ActivationCache`` that ``IHTransformer.run_with_cache`` returns."""

    def __getitem__(self, key: Any) -> Any:
        try:
            return super().__getitem__(key)
        except KeyError:
            name = key if isinstance(key, str) and key in self.model.hook_dict else _full_name(key)
            if name in self.model.hook_dict:
                cached = sorted(self.keys())
                message = f"{name!r} was not cached (run_with_cache's names_filter left it out); cached: {cached}"
                raise KeyError(message) from None
            raise KeyError(
                f"IHTransformer has no activation {name!r}: it has no residual stream, so TransformerLens names for "
                f"resid_pre/resid_mid/resid_post/attn_out/mlp_out, hook_q/hook_k and layer norms do not exist; "
                f"{STAGE_HINT}. Its hooks: {sorted(self.model.hook_dict)}"
            ) from None


def _full_name(key: Any) -> str:
    """TransformerLens's full hook name for a cache key (a name, a shorthand or a (name, layer, ...) tuple)."""
    try:
        return get_act_name(key) if isinstance(key, str) else get_act_name(*key)
    except (AssertionError, TypeError, ValueError, KeyError):
        return str(key)


def _no_residual_stream(method: str):
    def refuse(self: IHActivationCache, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"ActivationCache.{method} decomposes a residual stream, and IHTransformer has none (its layers pass "
            f"copies, a kernel and probabilities); read the per-head activations directly, e.g. "
            f"cache.stack_activation('pattern') or cache['z', 0], or {STAGE_HINT}"
        )

    refuse.__name__ = method
    refuse.__doc__ = "Not available on IHTransformer (no residual stream): raises ``NotImplementedError``."
    return refuse


for _method in RESIDUAL_METHODS:
    setattr(IHActivationCache, _method, _no_residual_stream(_method))
