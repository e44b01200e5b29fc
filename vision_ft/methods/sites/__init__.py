"""Sites: the one place where methods touch weights.

A *site* is one weight a method may adapt: a whole ``nn.Linear`` / ``nn.Conv2d`` / ``nn.LayerNorm``
weight, or a row-slice of a packed one (q, k or v inside timm's fused ``qkv``, open_clip's
``in_proj_weight``, Phi-3's ``qkv_proj`` / ``gate_up_proj``). The backbone says *where* a role's
weight lives (:class:`~vision_ft.backbones.base.WeightRef`); this module makes it a :class:`Site` with
one small API that every method uses, whatever library built the model:

- tensors: :meth:`Site.add_tensor` registers a method's parameter or buffer on the module that owns the
  weight, named ``<prefix><part>[_<key>]`` (the prefix rule: "trainable" and "saved" stay name filters);
- updates of the site's output ``y = W x + b`` (rows ``start:stop`` only):
  :meth:`Site.add_branch` (parallel: ``y + f(x)``, with the dense ``Delta W`` where ``f`` is linear),
  :meth:`Site.add_lowrank` (parallel ``up down pre(x)``; all low-rank branches of one module run as one
  product, so q, k and v of a fused projection cost what one LoRA on it costs),
  :meth:`Site.add_scale_shift` (``gamma * y + beta``) and :meth:`Site.add_output_map` (sequential,
  ``g(y)``, e.g. a bottleneck adapter; not mergeable); :meth:`Site.add_weight_map` (the module's forward
  reads ``fn(W)`` in place of a whole parameter ``W``: sparse entries written into a frozen weight;
  :func:`parameters` gives a site for every parameter of a model);
- :meth:`Site.effective_weight` / :meth:`Site.effective_bias` read ``W`` and ``b`` with every update
  folded in (differentiable), :meth:`Site.merge` writes them into the base weights exactly and
  removes every trace of the method, :meth:`Site.remove` removes it without merging.

How an update reaches the output depends on who reads the weight, and is decided here, once:

- the owning module's own forward computes the output (``nn.Linear``, conv, norm; transformers and
  diffusers projections): one forward hook per module applies all updates of all its row slices
  (disjoint slices are assembled with a single ``torch.cat``);
- a parent reads the parameter directly (``nn.MultiheadAttention`` reads ``in_proj_weight`` and
  ``out_proj.weight`` inside ``F.multi_head_attention_forward``; the ref names it as ``reader``): the
  parent's forward is wrapped. When every update is a linear map of the input in the current mode
  (no input dropout while training) the native attention runs on the effective weights; otherwise the
  attention is computed with ``F.scaled_dot_product_attention`` and the projections' outputs go
  through the same update code as a linear's.

Update functions receive the host module and read their tensors from it at call time (never from a
closure), so copies of the model (``copy.deepcopy``) carry working updates.

Layout: :mod:`.site` (the site and how to find sites), :mod:`.apply` (how updates reach a module's
output and fold into its weight), :mod:`.attention` (parent-read weights), :mod:`._state` (the
bookkeeping on adapted modules).
"""

from .site import (
    ParamRef, Site, at, merge_all, module_names, of_module, on_module, owned, parameters, remove_all, select,
)

__all__ = ["ParamRef", "Site", "at", "merge_all", "module_names", "of_module", "on_module", "owned", "parameters",
           "remove_all", "select"]
