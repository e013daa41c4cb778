"""Which Hugging Face causal LMs the patch supports, and how to find their classes.

Every supported class has the standard decoder layout of transformers 5: a backbone at
``self.model`` returning ``last_hidden_state`` after the final norm, the head at ``self.lm_head``,
and (Gemma 2) ``config.final_logit_softcapping`` applied to the logits. The patched forward relies
on exactly that, so an architecture is added here only once its forward has been read and tested.
"""
import importlib

# model_type (config.model_type) -> (transformers module, CausalLM class name)
SUPPORTED = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaForCausalLM"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3ForCausalLM"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralForCausalLM"),
    "gemma2": ("transformers.models.gemma2.modeling_gemma2", "Gemma2ForCausalLM"),
    "phi3": ("transformers.models.phi3.modeling_phi3", "Phi3ForCausalLM"),
}


def _unsupported(what: str) -> ValueError:
    return ValueError(f"ptcore.patch: {what} is not supported; supported architectures: "
                      f"{', '.join(sorted(SUPPORTED))} (their *ForCausalLM classes)")


def causal_lm_class(name: str) -> type:
    """The CausalLM class for a model_type (``"llama"``) or class name (``"LlamaForCausalLM"``)."""
    if not isinstance(name, str):
        raise TypeError(f"ptcore.patch_class: 'name' must be a str, got {type(name).__name__}")
    for model_type, (module, cls_name) in SUPPORTED.items():
        if name.lower() in (model_type, cls_name.lower()):
            return getattr(importlib.import_module(module), cls_name)
    raise _unsupported(f"architecture {name!r}")


def supported_base(model) -> type:
    """The supported CausalLM class ``model`` is an instance of (subclasses included, e.g. the
    class FSDP2 derives); raises ValueError listing the supported ones otherwise."""
    known = {(module, cls_name) for module, cls_name in SUPPORTED.values()}
    for cls in type(model).__mro__:  # by name: no need to import every architecture's module
        if (cls.__module__, cls.__name__) in known:
            return cls
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    what = f"{type(model).__name__}" + (f" (model_type {model_type!r})" if model_type else "")
    raise _unsupported(what)
