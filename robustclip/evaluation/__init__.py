"""Attack evaluation: the attack registry, suites, crafting, sanity checks, white-box
evaluation, transfer, ensembles and Lipschitz summaries, one module per idea.

Attacks come from torchattacks and run with the model in eval mode (spectral wrappers are
pass-throughs there), parameters frozen, on the model's device.  Inputs are images in
[0, 1] of shape (n, C, H, W) and int64 labels (n,); eps is in pixel units.
"""
from robustclip.evaluation.attacks import ATTACKS, NORMS, AttackDef, AttackSpec, make_spec
from robustclip.evaluation.cascade import VERSIONS, Cascade, cascade_of, make_cascade
from robustclip.evaluation.checks import SanityWarning
from robustclip.evaluation.craft import adversarial, craft, craft_seed, evaluating
from robustclip.evaluation.ensemble import Ensemble, check_one_dataset, model_bound
from robustclip.evaluation.evaluate import AttackResult, Evaluation, evaluate
from robustclip.evaluation.lipschitz import lipschitz_summary
from robustclip.evaluation.suites import Suite, load_suite, specs_for
from robustclip.evaluation.transfer import Transfer, transfer

__all__ = [
    "ATTACKS", "NORMS", "VERSIONS", "AttackDef", "AttackResult", "AttackSpec", "Cascade",
    "Ensemble", "Evaluation", "cascade_of", "make_cascade",
    "SanityWarning", "Suite", "Transfer", "adversarial", "check_one_dataset", "craft",
    "craft_seed",
    "evaluate", "evaluating", "lipschitz_summary", "load_suite", "make_spec", "model_bound",
    "specs_for", "transfer",
]
