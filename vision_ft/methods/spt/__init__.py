"""SPT: Sensitivity-aware visual Parameter-efficient fine-Tuning (He et al., ICCV 2023).

Two stages (paper Sec. 3; official code ``ziplab/SPT``: ``engine.get_sensitivity``,
``model/vision_transformer_timm.py``; method card docs/methods/spt.md):

1. **Sensitivity** (paper Sec. 3.1, "parameter sensitivity"; first-order Taylor
   estimate of the loss drop from tuning one parameter): on ``n_images`` training
   images (16 batches x 32) with the task's head as initialised (random) and the
   model in train mode, every weight ``w`` of q, k, v, proj, fc1, fc2 (and, with
   ``vectors``, every bias and LayerNorm entry of the blocks and the final norm)
   gets ``s(w) = sum_batches (dL/dw)^2`` of the batch-mean loss. q, k, v are the
   row blocks of timm's fused ``qkv`` (sites, :mod:`vision_ft.methods.sites`).
   The backbone is left unchanged: gradients come from ``torch.autograd.grad`` (no
   ``.grad`` written, no optimiser), ``requires_grad`` and train/eval modes are
   restored, the RNGs are forked and seeded.
2. **Allocation** (paper Sec. 3.2, Algorithm 1): take the weights whose score is
   at least ``tau`` (global top-tau over all scored tensors). A matrix holding
   ``c >= P_mod / alpha`` of them gets a structured module (LoRA:
   ``P_mod = r (d_in + d_out)``; Adapter: ``P_mod = 2 r d_out + r + d_out``), costing
   ``P_mod``; any other matrix has exactly its ``c`` selected entries tuned
   (unstructured sparse delta), costing ``c``. A vector holding ``c >= d / beta`` is
   tuned whole (``d``), otherwise its ``c`` entries (official ``--structured_vector``
   trick). The class token and the head are always trained; patch and position
   embeddings stay frozen. ``tau`` is the smallest threshold whose total fits the
   ``budget`` (bisection on the float32 bit pattern, exact). The slack this leaves
   (less than one structured module) is then filled by going on down the global
   ranking: an entry of a tensor still below its threshold is taken (cost 1), one
   that would make its tensor structured is taken only if the whole module fits in
   the slack (else that tensor is closed). The realised count thus equals the
   budget unless every remaining move would overshoot it (tiny budgets, or
   everything selected), and the final selection still satisfies the rule
   "structured iff ``c >= P_mod / alpha``".

Modules (every tensor named with the method prefix, registered on the module owning
the weight it acts on and applied through the site layer, :mod:`vision_ft.methods.sites`;
the model keeps its type):

* SPT-LoRA (card; official ``BlockSPTParallel``): ``h = W x + DropPath(B A Dropout(x))``,
  no ``alpha / r`` scaling, ``A`` Kaiming-uniform (``a = sqrt 5``), ``B = 0``.
* SPT-Adapter (card; official ``BlockSPTSeq``): sequential on the matrix output,
  ``h <- h + DropPath(U GELU(D Dropout(h)))``, ``D`` Kaiming-uniform with the
  ``nn.Linear`` default bias, ``U`` weight and bias 0.
* For q / k / v the module acts on that slice of the fused ``qkv`` output.
* Unstructured delta: ``y = x (W + scatter(delta))^T + b`` with ``delta`` (k,) zero at
  init; computed as ``x W^T + b + Delta(x)`` by :mod:`vision_ft.methods._sparse`
  (gradient ``sum_t g[t,i] x[t,j]`` at the k selected pairs only; O(T k), not the
  official O(k^2) matrix).
* Vectors: an additive delta on the bias (``y + db``) or on the LayerNorm affine
  (``y + dw * xhat + db``), whole or at the selected entries.
* Class token: a delta ``spt_*_cls_token`` added to token 0 by a pre-hook on
  ``pos_drop`` (before the dropout, as the token itself would be), so the trained
  token is ``cls_token + delta`` while ``cls_token`` keeps its name and stays frozen
  (the contract: only prefixed tensors train).

The allocation is stored in the backbone as prefixed buffers: ``<prefix>allocation``
(one code per scored tensor, 0 none / 1 sparse / 2 structured, in :func:`score_sites`
order) and ``<...>_index`` (the selected entries), so adapters and Lightning
checkpoints hold it and :meth:`load_adapter` rebuilds the modules without scoring.

Differences from the official code (choices or bug fixes):

* Sensitivity images: a seeded random subset of the training set (the official
  loader reads the first ``16 x 32`` training images in file order).
* The slack fill above (the official sweeps the top-k count in steps of 0.02M and
  keeps the configuration closest to each budget, so its budgets are approximate).
* Unstructured LayerNorm entries are trained (the official counts them in the
  budget but only replaces ``nn.Linear`` layers, so they stay frozen).
* The q/k/v deltas act on slices of timm's fused ``qkv``; the official model
  splits it into three ``nn.Linear`` (same function).
* SPT-Adapter on ``proj``: sequential on its output as the card says; the official
  ``AttentionSPTSeq`` feeds the proj *input* to that adapter (parallel). Dropout on
  the structured input is applied to every module (the official skips it for proj).
* One dropout draw per module (the official shares one draw of ``x`` among q, k, v).
* Weight decay follows the kit: none on 1-D tensors and on the class-token delta
  (the official: none on 1-D tensors, biases and ``cls_token``) -- the same sets.
* The official adapter scripts read the *LoRA* sensitivity files
  (``sensitivity_spt_supervised_lora_a10``) for SPT-Adapter; here each variant
  allocates with its own ``P_mod``.

Cost: the sensitivity stage is ``n_images`` forward+backward passes (seconds on a
GPU for ViT-B/16) plus a sort of the scores (85M floats on ViT-B/16: ~1 GB of
temporary memory on the scoring device). SPT-LoRA merges exactly
(``W' = W + B A + scatter(delta)``, biases / norms / class token likewise) and then
costs nothing at inference. SPT-Adapter cannot merge; unmerged, each structured
matrix adds ``2 r d_out`` multiply-adds per token (+ a GELU), each sparse matrix
``k``, each vector delta ``d`` adds: at a 0.4M budget on ViT-B/16 (197 tokens) at
most ~0.4M MACs per token, i.e. <= 80 MMACs per image over 17.6 GMACs (<= 0.5%),
plus a few small kernels per adapted site (launch overhead dominates at batch 1).

Layout: :mod:`.scoring` (what is scored, the sensitivity pass), :mod:`.allocation` (the budget),
:mod:`.layers` (the structured modules and the update functions), :mod:`.method` (the methods).
"""

from .allocation import Allocation, allocate
from .layers import SPTAdapterModule, SPTLoRAModule
from .method import SPTAdapter, SPTLoRA
from .scoring import MATRIX_ROLES, NONE, SPARSE, STRUCTURED, ScoredTensor, score_sites, sensitivity, sensitivity_batches

__all__ = ["Allocation", "allocate", "SPTAdapterModule", "SPTLoRAModule", "SPTAdapter", "SPTLoRA", "MATRIX_ROLES",
           "NONE", "SPARSE", "STRUCTURED", "ScoredTensor", "score_sites", "sensitivity", "sensitivity_batches"]
