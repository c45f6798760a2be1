"""Datasets: image sets embedded in installed packages, synthetic priors with exact densities,
and a registry to load any by name."""

from cleanprior.data.embedded import (
    DATASETS,
    SPLITS,
    TEST_FRACTION,
    digits,
    faces,
    load,
    mnist5k,
    register,
)
from cleanprior.data.synthetic import manifold, manifold_prior, mixture, mixture_prior

__all__ = [
    "DATASETS",
    "SPLITS",
    "TEST_FRACTION",
    "digits",
    "faces",
    "load",
    "manifold",
    "manifold_prior",
    "mixture",
    "mixture_prior",
    "mnist5k",
    "register",
]
from cleanprior.data.files import (  # noqa: E402  (files imports the loaders above through the operators)
    ObservationFileError,
    ObservationReader,
    Observations,
    corrupt_dataset,
    load_clean,
    load_observations,
    open_observations,
    save_observations,
)

__all__ += [
    "ObservationFileError",
    "ObservationReader",
    "Observations",
    "corrupt_dataset",
    "load_clean",
    "load_observations",
    "open_observations",
    "save_observations",
]
