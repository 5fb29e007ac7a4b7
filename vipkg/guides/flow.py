"""Normalizing-flow guides over the unconstrained vector, built on normflows."""

from __future__ import annotations

import math
from collections.abc import Sequence

import normflows as nf
import torch
from torch import nn
from torch.distributions import Distribution, constraints

from vipkg._rng import seeded
from vipkg.guides.base import Guide

__all__ = ["Flow", "FlowDistribution"]


class FlowDistribution(Distribution):
    """The distribution of a :class:`Flow` guide: base draw pushed through the layers.

    ``rsample`` runs the flow's forward (sampling) direction; ``log_prob`` runs
    its inverse, as normflows' ``NormalizingFlow.log_prob`` does. Batch shapes
    are flattened to normflows' single batch dimension and restored.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, guide: Flow):
        self._guide = guide
        super().__init__(torch.Size(), torch.Size([guide.dim]), validate_args=False)

    def rsample(self, sample_shape=()) -> torch.Tensor:
        return self._guide.rsample_and_log_prob(sample_shape)[0]

    def sample(self, sample_shape=()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self._guide.log_prob(value)


class Flow(Guide):
    """A normalizing flow ``z = f_L o ... o f_1(z_0)``, ``z_0 ~ q_0``, as a guide.

    Wraps a normflows ``NormalizingFlow`` (its ``q0`` and ``flows``) or a plain
    list of normflows layers (then ``q_0`` is a trainable diagonal Gaussian) over
    the model's flat unconstrained vector. The flow's parameters are the guide's
    parameters and are trained in place.

    Parameters
    ----------
    model : vipkg.Model
    flow : normflows.NormalizingFlow or sequence of normflows.flows.Flow
        Every layer maps ``[n, dim] -> ([n, dim], log|det J| [n])`` in the sampling
        direction and has an ``inverse``.
    dtype : torch.dtype, optional
        The flow is converted to it; default: the flow's own floating dtype.

    Notes
    -----
    normflows' ``ActNorm`` initialises itself from the first batch it sees and
    reads a flag on the host on every call; here the first batch would be base
    draws, not data, so the guide marks every ActNorm as initialised (identity
    start) and the constructors use ``AffineConstFlow`` (the same layer without
    the data-dependent start). ``log|det J|`` is accumulated out of place because
    some normflows layers return it as ``float32`` and in-place accumulation
    would silently round a ``float64`` flow.

    References
    ----------
    .. [1] Rezende, D. J., Mohamed, S. "Variational Inference with Normalizing
       Flows". ICML (2015).
    .. [2] Stimper, V., Liu, D., Campbell, A., Berenz, V., Ryll, L., Schölkopf, B.,
       Hernández-Lobato, J. M. "normflows: A PyTorch Package for Normalizing Flows".
       JOSS 8 (2023).
    """

    def __init__(self, model, flow, *, dtype=None):
        super().__init__(model)
        if isinstance(flow, nf.NormalizingFlow):
            q0, layers = flow.q0, list(flow.flows)
        elif isinstance(flow, (Sequence, nn.ModuleList)) and not isinstance(flow, (str, bytes)):
            layers = list(flow)
            q0 = nf.distributions.DiagGaussian(self.dim, trainable=True)
        else:
            raise TypeError(
                f"Flow expects a normflows.NormalizingFlow or a list of normflows layers, "
                f"got {type(flow).__name__}."
            )
        for i, layer in enumerate(layers):
            if not isinstance(layer, nn.Module):
                raise TypeError(f"layer {i} of the flow is a {type(layer).__name__}, not a torch Module.")
            for m in layer.modules():
                if isinstance(m, nf.flows.ActNorm):
                    m.data_dep_init_done = torch.ones_like(m.data_dep_init_done)
        self.flow = nf.NormalizingFlow(q0, layers)
        if dtype is None:
            floats = [
                t for t in list(self.flow.parameters()) + list(self.flow.buffers()) if t.is_floating_point()
            ]
            dtype = floats[0].dtype if floats else torch.get_default_dtype()
        self.flow.to(dtype)
        self._check_shapes(dtype)

    def _check_shapes(self, dtype) -> None:
        # A wrong dimension would otherwise surface deep inside a conditioner net.
        try:
            with torch.no_grad(), seeded(0):
                z, log_q = self.rsample_and_log_prob((2,))
        except Exception as err:  # noqa: BLE001 - re-raised with context
            raise ValueError(
                f"the flow could not draw from a {self.dim}-dimensional base (the model's dim): {err}"
            ) from err
        if z.shape != (2, self.dim) or log_q.shape != (2,):
            raise ValueError(
                f"the flow maps draws to shape {tuple(z.shape[1:])} with log-density shape "
                f"{tuple(log_q.shape[1:])}; the model needs ({self.dim},) and ()."
            )

    # ---------------------------------------------------------------- protocol
    @property
    def layers(self) -> nn.ModuleList:
        """The flow's layers in the sampling direction."""
        return self.flow.flows

    @property
    def base(self) -> nn.Module:
        """The base distribution ``q_0`` (a normflows ``BaseDistribution``)."""
        return self.flow.q0

    def forward(self) -> FlowDistribution:
        return FlowDistribution(self)

    def rsample_and_log_prob(self, shape=()):
        shape = torch.Size(shape)
        n = math.prod(shape)
        z, log_q = self.flow.q0(n)
        for layer in self.flow.flows:
            z, log_det = layer(z)
            log_q = log_q - log_det
        return z.reshape(*shape, self.dim), log_q.reshape(shape)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z) by the inverse pass, for ``z: [*batch, dim]``; shape ``batch``."""
        batch = z.shape[:-1]
        x = z.reshape(-1, self.dim)
        log_q = x.new_zeros(x.shape[0])
        for layer in reversed(self.flow.flows):
            x, log_det = layer.inverse(x)
            log_q = log_q + log_det
        return (log_q + self.flow.q0.log_prob(x)).reshape(batch)

    # ------------------------------------------------------------ constructors
    @classmethod
    def real_nvp(
        cls,
        model,
        layers: int = 8,
        hidden: int = 64,
        *,
        permute: str = "swap",
        actnorm: bool = True,
        dtype=None,
    ) -> Flow:
        """A RealNVP flow: affine coupling blocks, permutations and per-dimension affine layers.

        Parameters
        ----------
        model : vipkg.Model
            Needs ``model.dim >= 2`` (a coupling layer splits the vector in two).
        layers : int
            Number of coupling blocks.
        hidden : int
            Width of the two hidden layers of each conditioner MLP.
        permute : {"swap", "shuffle", "lu"}
            Mixing between blocks: swap halves, a fixed random permutation, or a
            trainable LU-parameterised linear map with a permutation (``LULinearPermute``).
        actnorm : bool
            Add a trainable per-dimension affine layer (``AffineConstFlow``) after each block.
        dtype : torch.dtype, optional
            Default ``torch.get_default_dtype()``.

        Notes
        -----
        The last layer of each conditioner starts at zero, so the flow starts as
        the identity map on a standard normal base (whose mean and scale are trainable).

        References
        ----------
        .. [1] Dinh, L., Sohl-Dickstein, J., Bengio, S. "Density Estimation Using
           Real NVP". ICLR (2017).
        .. [2] Kingma, D. P., Dhariwal, P. "Glow: Generative Flow with Invertible
           1x1 Convolutions". NeurIPS (2018).
        """
        d = _check_flow_args(model, layers, hidden)
        if permute not in ("swap", "shuffle", "lu"):
            raise ValueError(f"permute must be 'swap', 'shuffle' or 'lu', got {permute!r}.")
        d1, d2 = (d + 1) // 2, d // 2  # how Tensor.chunk(2) splits an odd dimension
        flows = []
        for _ in range(layers):
            net = nf.nets.MLP([d1, hidden, hidden, 2 * d2], init_zeros=True)
            flows.append(nf.flows.AffineCouplingBlock(net, scale_map="exp", split_mode="channel"))
            if permute == "lu":
                flows.append(nf.flows.LULinearPermute(d))
            else:
                flows.append(nf.flows.Permute(d, mode=permute))
            if actnorm:
                flows.append(nf.flows.AffineConstFlow((d,)))
        base = nf.distributions.DiagGaussian(d, trainable=True)
        return cls(model, nf.NormalizingFlow(base, flows), dtype=dtype or torch.get_default_dtype())

    @classmethod
    def neural_spline(
        cls,
        model,
        layers: int = 4,
        hidden: int = 32,
        *,
        blocks: int = 2,
        bins: int = 8,
        tail_bound: float = 3.0,
        dtype=None,
    ) -> Flow:
        """A neural spline flow: rational-quadratic spline couplings with LU-linear mixing.

        Parameters
        ----------
        model : vipkg.Model
            Needs ``model.dim >= 2``.
        layers : int
            Number of spline coupling layers (alternating masks).
        hidden : int
            Width of each conditioner's residual net.
        blocks : int
            Residual blocks per conditioner.
        bins : int
            Spline bins on ``[-tail_bound, tail_bound]``; identity (linear tails) outside.
        dtype : torch.dtype, optional

        Notes
        -----
        normflows' spline masks points inside the spline interval with boolean
        indexing, which reads a count on the host; on a GPU that costs a sync per layer.

        References
        ----------
        .. [1] Durkan, C., Bekasov, A., Murray, I., Papamakarios, G. "Neural Spline
           Flows". NeurIPS (2019).
        """
        d = _check_flow_args(model, layers, hidden)
        if not isinstance(bins, int) or bins < 2:
            raise ValueError(f"bins must be an int >= 2, got {bins!r}.")
        flows = []
        for i in range(layers):
            flows.append(
                nf.flows.CoupledRationalQuadraticSpline(
                    d, blocks, hidden, num_bins=bins, tail_bound=tail_bound, reverse_mask=bool(i % 2)
                )
            )
            flows.append(nf.flows.LULinearPermute(d))
        base = nf.distributions.DiagGaussian(d, trainable=True)
        return cls(model, nf.NormalizingFlow(base, flows), dtype=dtype or torch.get_default_dtype())


def _check_flow_args(model, layers, hidden) -> int:
    d = model.dim
    if d < 2:
        raise ValueError(
            f"coupling flows split the latent vector in two, but model {model.name!r} has dim {d}; "
            "use MeanFieldNormal for one-dimensional models."
        )
    if not isinstance(layers, int) or layers < 1:
        raise ValueError(f"layers must be a positive int, got {layers!r}.")
    if not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"hidden must be a positive int, got {hidden!r}.")
    return d
