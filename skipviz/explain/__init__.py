"""Explanations with Captum: did the blocks a policy bypassed matter, and does skipping change where the
network looks?

* :func:`block_importance` - one number per block for one input on the **full** network, returned next to
  the policy's skip decisions for that input. Methods:

  - ``"taylor"`` (default): ``sum(dlogit_t / d out_i * (out_i - bypass_i(in_i)))``, the first-order estimate
    of how much the target logit changes when block i is replaced by its bypass. The gradients at every
    block output come from one Captum :class:`~captum.attr.LayerGradientXActivation` pass with
    ``multiply_by_inputs=False`` (layer gradients).
  - ``"grad_x_act"``: Captum :class:`~captum.attr.LayerGradientXActivation` summed over the block output.
  - ``"conductance"``: Captum :class:`~captum.attr.LayerConductance` per block (``n_steps`` integration
    steps from a zero baseline image), summed over the block output.

  ``share`` is ``|importance| / sum |importance|`` (sums to 1).

* :func:`attribution_maps` / :func:`explain` - attribution maps for the full run and the skipped run of the
  same input, plus how much they differ (Spearman rank correlation and top-k overlap):

  - ``"gradcam"``: Captum :class:`~captum.attr.LayerGradCam` on the feature map the prediction is read from
    (the classifier head's input, or the exit probe's input after an early exit) - it exists in both runs
    whatever was bypassed, upsampled to the input size;
  - ``"integrated_gradients"``: Captum :class:`~captum.attr.IntegratedGradients` on the input (zero baseline),
    ``|attribution|`` summed over colour channels.

  The skipped run is ``net.run`` under the *frozen* decisions the policy took for this input (a static mask,
  plus the exit if it exited), so that the attribution function is the sub-network the input really went
  through (gates re-evaluated along an integration path would switch blocks on and off midway). A bypassed
  block produces no activation in that run: it is never hooked, and its per-block values are NaN with
  ``"bypassed"`` in the table - nothing waits for a hook output that cannot come.

Thread safety: Captum registers hooks on the model's modules. All attribution runs on a private replica of
the model (:mod:`skipviz.explain.runs`), serialised by one lock per replica.

The frozen decisions are :class:`skipviz.policies.simple.FrozenPolicy`.
"""
from .importance import IMPORTANCE_METHODS, BlockImportance, block_importance, executed_block_gradients
from .maps import MAP_DESCRIPTIONS, MAP_METHODS, Explanation, MapComparison, attribution_maps, compare_maps, explain
from .runs import RunDecisions, replica, run_decisions

__all__ = [
    "BlockImportance", "Explanation", "IMPORTANCE_METHODS", "MAP_DESCRIPTIONS", "MAP_METHODS", "MapComparison",
    "RunDecisions", "attribution_maps", "block_importance", "compare_maps", "executed_block_gradients", "explain",
    "replica", "run_decisions",
]
