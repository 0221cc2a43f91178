"""The attacks, one module each: `badnets` (poisoned fine-tuning), `sbv` (the Sparse Backdoor Vector),
`badmerging` (BadMerging's trigger-and-feature attack), `inherent` (patches optimised against a frozen
model: the paper's inherent triggers, BadMerging's universal trigger)."""

from bvlib.attacks.badmerging import BadMergingPoison, badmerging_finetune, badmerging_poison
from bvlib.attacks.badnets import Poison, badnets_poison
from bvlib.attacks.inherent import inherent_trigger, optimize_trigger, trigger_asr_table
from bvlib.attacks.sbv import SBV_COMBINE, sparse_backdoor_vector

__all__ = [
    "SBV_COMBINE",
    "BadMergingPoison",
    "Poison",
    "badmerging_finetune",
    "badmerging_poison",
    "badnets_poison",
    "inherent_trigger",
    "optimize_trigger",
    "sparse_backdoor_vector",
    "trigger_asr_table",
]
