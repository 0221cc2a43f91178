"""Defenses against backdoors in model merging, each one operation on the merge.

- **IBVS** (Injection Backdoor Vector Subtraction; the paper's defense). The defender, knowing nothing
  of the attack, implants its *own* backdoor (a small white square) in a task it controls, takes that
  Backdoor Vector BV = θ_backdoored − θ_clean, and subtracts it *during* merging, at the merge's own
  scale: `ibvs_vector` makes the BV, `merge_with_ibvs` merges −strength·BV as one more task vector;
  `placebo_vector` gives what it is judged against (a zero, a random and a seed-divergence vector of
  the same norm, through the same merge path).
- **TBAR** (backdoor unlearning by linear task decomposition, 2025). The trigger's task vector is
  estimated by fine-tuning the suspect model on triggered images labelled with the target class and
  negated: θ_clean ≈ θ − α·τ_trigger. The trigger is known, or reverse-engineered per candidate
  target class (the suspected target is the one whose reverse-engineered trigger works best): `tbar`.
- **DAM** (Defense-Aware Merging; Yang et al., ICLR 2025, as its reference code in FusionBench's
  "safe concrete task arithmetic" runs it): one per-coordinate concrete mask shared by the task
  vectors, learnt on unlabeled images with an entropy objective on clean images and on images with
  per-task universal adversarial perturbations: `dam`.

All three work on flat `Weights`; merges are merged *task vectors* τ_merged (add θ0 for a model), as
`bvlib.merging.merge` returns.
"""

from bvlib.defenses.dam import dam
from bvlib.defenses.ibvs import (
    PLACEBOS,
    defender_target,
    ibvs_trigger,
    ibvs_vector,
    ibvs_vectors,
    merge_with_ibvs,
    placebo_vector,
)
from bvlib.defenses.scan import SCAN_CALIBRATION, scan
from bvlib.defenses.tbar import (
    ALPHA_GRID,
    TBAR_VERSION,
    search_patches,
    suspect_target,
    tbar,
    trigger_task_model,
)

__all__ = [
    "ALPHA_GRID",
    "PLACEBOS",
    "SCAN_CALIBRATION",
    "TBAR_VERSION",
    "dam",
    "defender_target",
    "ibvs_trigger",
    "ibvs_vector",
    "ibvs_vectors",
    "merge_with_ibvs",
    "placebo_vector",
    "scan",
    "search_patches",
    "suspect_target",
    "tbar",
    "trigger_task_model",
]
