"""The model zoo: each function returns a :class:`vipkg.Model`; data bundled or synthetic.

Every model exists as a fast hand-written batched log density (``form="tensor"``,
the default) and as a Pyro program (``form="pyro"``); the tests check they agree.
"""

from vipkg.models.bnn import bnn_regression
from vipkg.models.conjugate import dirichlet_multinomial, gamma_poisson
from vipkg.models.eight_schools import eight_schools
from vipkg.models.enumerated import capture_recapture, gaussian_hmm, weighted_mixture
from vipkg.models.flow_targets import gaussian_mixture, phi4
from vipkg.models.gamma_def import sparse_gamma_def
from vipkg.models.gaussians import funnel, gaussian, linear_regression_conjugate
from vipkg.models.gp_classification import gp_classification
from vipkg.models.hard import (
    HARD_POSTERIORS,
    ar_series,
    correlated_regression,
    eight_schools_centered,
    random_walk,
    stochastic_volatility,
)
from vipkg.models.logistic import logistic_regression
from vipkg.models.mixture import discrete_mixture, sigmoid_belief_net
from vipkg.models.targets import banana
from vipkg.models.vae import (
    categorical_vae_digits,
    categorical_vae_digits_guide,
    heldout_elbo,
    vae_digits,
    vae_digits_guide,
)

#: name -> constructor, for the CLI and the zoo-wide tests
ZOO = {
    "logistic_regression": logistic_regression,
    "eight_schools": eight_schools,
    "gaussian": gaussian,
    "funnel": funnel,
    "linear_regression_conjugate": linear_regression_conjugate,
    "dirichlet_multinomial": dirichlet_multinomial,
    "gamma_poisson": gamma_poisson,
    "sparse_gamma_def": sparse_gamma_def,
    "gaussian_mixture": gaussian_mixture,
    "phi4": phi4,
    "discrete_mixture": discrete_mixture,
    "sigmoid_belief_net": sigmoid_belief_net,
    "weighted_mixture": weighted_mixture,
    "gaussian_hmm": gaussian_hmm,
    "capture_recapture": capture_recapture,
    "bnn_regression": bnn_regression,
    "banana": banana,
    "gp_classification": gp_classification,
    "correlated_regression": correlated_regression,
    "random_walk": random_walk,
    "ar_series": ar_series,
    "stochastic_volatility": stochastic_volatility,
    "vae_digits": vae_digits,
    "categorical_vae_digits": categorical_vae_digits,
}

__all__ = [
    "ZOO",
    "logistic_regression",
    "eight_schools",
    "gaussian",
    "funnel",
    "linear_regression_conjugate",
    "dirichlet_multinomial",
    "gamma_poisson",
    "sparse_gamma_def",
    "gaussian_mixture",
    "phi4",
    "discrete_mixture",
    "sigmoid_belief_net",
    "weighted_mixture",
    "gaussian_hmm",
    "capture_recapture",
    "bnn_regression",
    "banana",
    "gp_classification",
    "HARD_POSTERIORS",
    "correlated_regression",
    "random_walk",
    "eight_schools_centered",
    "ar_series",
    "stochastic_volatility",
    "vae_digits",
    "categorical_vae_digits",
    "vae_digits_guide",
    "categorical_vae_digits_guide",
    "heldout_elbo",
]
