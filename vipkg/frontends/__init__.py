"""Front-ends: other ways of writing a model, each turned into a :class:`vipkg.Model`.

- :mod:`vipkg.frontends.log_density`: a plain log density over one vector
  (:meth:`vipkg.Model.from_log_density`);
- :mod:`vipkg.frontends.pyro`: any Pyro program (:meth:`vipkg.Model.from_pyro`);
- :mod:`vipkg.frontends.gpytorch`: a GPyTorch approximate GP, as a (Model, Guide) pair
  (:func:`~vipkg.frontends.gpytorch.SVGP`; also importable as ``vipkg.gp``).

The submodules are imported on demand, so that Pyro and GPyTorch load only when used.
"""

__all__ = ["log_density", "pyro", "gpytorch"]
