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

# Names the command line accepts for --data, and the loader each names.
LOADERS = {
    "census-income": census_income,
    "multifashion": multifashion,
    "ali-ccp": ali_ccp,
    "aliexpress": aliexpress,
}


def load_dataset(name: str, root=None) -> Dataset:
    """A data set by its command-line name (see `LOADERS`), read from `root`.

    Raises:
        InputError: the name is unknown, or the loader cannot read `root`.
    """
    from ..errors import InputError

    loader = LOADERS.get(name)
    if loader is None:
        raise InputError(
            f"unknown data set '{name}'; choose one of {', '.join(LOADERS)}"
        )
    if root is None and name != "multifashion":
        raise InputError(f"--data {name} needs --data-root FOLDER with its files")
    return loader(root) if root is not None else loader()


__all__ = [
    "LOADERS",
    "load_dataset",
    "Dataset",
    "Split",
    "ali_ccp",
    "aliexpress",
    "census_income",
    "multifashion",
]
