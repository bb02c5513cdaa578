"""Data sets of the paper's experiments, as `Dataset` objects of tensor `Split`s.

Each loader reads local files (nothing is cached on disk) and returns train,
validation and test rows with their tasks:

- `census_income`: Census-Income (KDD), tasks ``income`` and ``never_married``.
- `ali_ccp`, `aliexpress`: CTR/CVR sets in torch-rechub's format, tasks ``ctr`` and
  ``cvr``.
- `multifashion`: two overlapped Fashion-MNIST items, tasks ``left`` and ``right``.
"""

from ._split import Dataset, Split
from .alibaba import ali_ccp, aliexpress
from .census import census_income
from .multifashion import multifashion

__all__ = [
    "Dataset",
    "Split",
    "ali_ccp",
    "aliexpress",
    "census_income",
    "multifashion",
]
