"""Old import path of the GPyTorch front-end, kept working: see :mod:`vipkg.frontends.gpytorch`."""

from vipkg.frontends.gpytorch import (
    INNER,
    SVGP,
    SVGPGuide,
    approximate_gp,
    gauss_hermite,
    gpytorch_elbo,
    log_ndtr,
)

__all__ = ["SVGP", "SVGPGuide", "approximate_gp", "gpytorch_elbo", "gauss_hermite", "log_ndtr", "INNER"]
