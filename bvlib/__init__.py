"""bvlib: Backdoor Vectors — task arithmetic for backdoor attacks and defenses on CLIP merges."""

from bvlib.errors import BVLibError
from bvlib.weights import Layout, Weights, apply_vector, backdoor_vector, cosine_matrix, stack, task_vector

__all__ = [
    "BVLibError",
    "Layout",
    "Weights",
    "apply_vector",
    "backdoor_vector",
    "cosine_matrix",
    "stack",
    "task_vector",
]
__version__ = "0.1.0"
