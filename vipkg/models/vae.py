"""Variational autoencoders on scikit-learn's bundled digits: a Gaussian code and a categorical code.

The data are the 1797 8x8 images of ``sklearn.datasets.load_digits`` (bundled, nothing is
downloaded), binarized at half the maximum intensity (pixel > 8 of 16). The first 1437 images
are the training split, the last 360 the test split. Each model is a decoder network (its
weights are the model's parameters, which :func:`vipkg.fit` learns with the guide) and a local
latent code per image, in a subsampled plate ``"data"`` when ``batch_size`` is given (fitted one
minibatch at a time; the likelihood is scaled by ``N / batch_size``):

- :func:`vae_digits`: ``z_i ~ N(0, I_d)``, ``x_i ~ Bernoulli(logits = decoder(z_i))``
  (Kingma & Welling 2014);
- :func:`categorical_vae_digits`: ``z_i`` is ``codes`` independent one-hot vectors over
  ``categories`` values, uniform a priori, ``x_i ~ Bernoulli(decoder(flatten(z_i)))``
  (Jang et al. 2017, at this scale).

:func:`vae_digits_guide` and :func:`categorical_vae_digits_guide` give the default amortized
guide (an MLP encoder), and :func:`heldout_elbo` the bound of a fitted model and guide on the
test images.
"""

from __future__ import annotations

import functools
import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import constraints

from vipkg._rng import seeded
from vipkg.model import SUBSAMPLE_KEY, Model, Plate, Site
from vipkg.models._common import check_batch_size, check_form

__all__ = [
    "vae_digits",
    "categorical_vae_digits",
    "vae_digits_guide",
    "categorical_vae_digits_guide",
    "heldout_elbo",
    "load_binarized_digits",
    "mlp",
    "TRAIN_ROWS",
]

#: Images in the training split (the first 80%); the remaining 360 are the test split.
TRAIN_ROWS = 1437
_PIXELS = 64
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def load_binarized_digits(split: str = "train", dtype=None) -> torch.Tensor:
    """scikit-learn's 8x8 digits as 0./1. rows ``[n, 64]``: ``pixel > 8`` (half the maximum, 16).

    ``split``: ``"train"`` (the first 1437 images), ``"test"`` (the last 360) or ``"all"``.
    """
    from sklearn.datasets import load_digits

    x = torch.as_tensor(load_digits().data > 8.0, dtype=dtype or torch.get_default_dtype())
    if split == "train":
        return x[:TRAIN_ROWS]
    if split == "test":
        return x[TRAIN_ROWS:]
    if split == "all":
        return x
    raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}.")


def mlp(sizes, *, seed: int = 0, dtype=None) -> nn.Sequential:
    """``Linear -> Softplus -> ... -> Linear`` with layer ``sizes``, initialized from ``seed`` (torch's
    default initialization on a forked RNG: the caller's stream is left as it was)."""
    layers = []
    with seeded(seed):
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i:
                layers.append(nn.Softplus())
            layers.append(nn.Linear(a, b, dtype=dtype or torch.get_default_dtype()))
    return nn.Sequential(*layers)


def _check(split, batch_size, n, hidden):
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}.")
    check_batch_size(batch_size, n)
    if not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"hidden must be a positive int, got {hidden!r}.")


def _rows(data):
    """The minibatch's rows of ``x`` and the likelihood's scale ``N / B`` (all rows, 1 without one)."""
    x = data["x"]
    idx = data.get(SUBSAMPLE_KEY + "data")
    if idx is None:
        return x, 1.0
    return x.index_select(0, idx), x.shape[0] / idx.shape[0]


def _bernoulli_ll(logits, x):
    """``log Bernoulli(x | logits)`` summed over pixels: ``[S, B]`` for logits ``[S, B, 64]``."""
    return (x * logits).sum(-1) - F.softplus(logits).sum(-1)


def _build(kind, *, split, batch_size, decoder, form, seed, dtype, shape, hidden, name):
    """The tensor or Pyro form of one of the two VAEs (``kind``: ``"gaussian"`` / ``"categorical"``)."""
    check_form(form)
    dtype = dtype or torch.get_default_dtype()
    x = load_binarized_digits(split, dtype)
    N = x.shape[0]
    _check(split, batch_size, N, hidden)
    if batch_size is not None and batch_size == N:
        batch_size = None
    code = math.prod(shape)
    if decoder is None:
        decoder = mlp([code, hidden, _PIXELS], seed=seed, dtype=dtype)
    config = {
        "kind": kind,
        "shape": tuple(shape),
        "hidden": hidden,
        "batch_size": batch_size,
        "form": form,
        "dtype": dtype,
        "seed": seed,
    }
    name = f"{name}[{split}]"
    categories = shape[-1]
    if kind == "gaussian":
        support = constraints.independent(constraints.real, 1)
    else:
        support = constraints.independent(constraints.one_hot, 1)
    if form == "pyro":
        model = _pyro_form(kind, x, decoder, shape, batch_size, name)
    else:

        def terms(latents, data):
            z = latents["z"]
            rows, scale = _rows(data)
            logits = decoder(z.reshape(*z.shape[: -len(shape)], code))
            if kind == "gaussian":
                prior = (-0.5 * z.square() - _HALF_LOG_2PI).sum(-1)
            else:
                # Uniform over the categories, for one-hot or relaxed (simplex) codes alike.
                prior = z.sum((-1, -2)) * -math.log(categories)
            return {"z": scale * prior, "x": scale * _bernoulli_ll(logits, rows)}

        def log_joint(latents, data):
            t = terms(latents, data)
            return (t["z"] + t["x"]).sum(-1)

        def pointwise(latents, data):
            z = latents["z"]
            rows, _ = _rows(data)
            return {"x": _bernoulli_ll(decoder(z.reshape(*z.shape[: -len(shape)], code)), rows)}

        local = batch_size is not None
        model = Model(
            {"z": Site(torch.Size([N, *shape]), support)},
            log_joint,
            data={"x": x},
            name=name,
            log_joint_terms=terms,
            term_sites={"z": {"z"}, "x": {"z"}},
            term_plates={"z": {"data": -1}, "x": {"data": -1}},
            pointwise_log_likelihood=pointwise,
            observed={"x": x},
            params={f"decoder.{k}": p for k, p in decoder.named_parameters()},
            plates={"data": Plate(N, batch_size)} if local else None,
            local_sites={"z": ("data", 0)} if local else None,
        )
    #: The decoder network (its parameters are the model's) and how the model was built, for
    #: :func:`heldout_elbo` and the guide factories.
    model.decoder = decoder
    model.vae = config
    #: The default amortized guide, ``model.default_guide(model)`` (what ``vipkg compare`` fits).
    factory = vae_digits_guide if kind == "gaussian" else categorical_vae_digits_guide
    model.default_guide = functools.partial(factory, hidden=hidden)
    return model


#: decoder -> the Pyro program that owns it: a PyroModule runs inside one supermodule only, so a
#: shared decoder (the test split of a fitted model) reuses its program.
_PROGRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _pyro_form(kind, x, decoder, shape, batch_size, name):
    import pyro
    import pyro.distributions as dist
    from pyro.nn import PyroModule
    from pyro.nn.module import to_pyro_module_

    program = _PROGRAMS.get(decoder)
    if program is None:
        if not isinstance(decoder, PyroModule):
            to_pyro_module_(decoder)  # in place: its parameters become the program's (model) parameters
        code = math.prod(shape)

        class VAE(PyroModule):
            def __init__(self):
                super().__init__()
                self.decoder = decoder

            def forward(self, x, batch_size):
                with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
                    if kind == "gaussian":
                        prior = dist.Normal(torch.zeros(shape, dtype=x.dtype), 1.0).to_event(1)
                    else:
                        # validate_args=False: GumbelSoftmax hands the model relaxed (soft) one-hot codes.
                        logits = torch.zeros(shape, dtype=x.dtype)
                        prior = dist.OneHotCategorical(logits=logits, validate_args=False).to_event(1)
                    z = pyro.sample("z", prior)
                    logits = self.decoder(z.reshape(*z.shape[: z.dim() - len(shape)], code))
                    pyro.sample(
                        "x", dist.Bernoulli(logits=logits, validate_args=False).to_event(1), obs=x[idx]
                    )

        program = VAE()
        _PROGRAMS[decoder] = program
    return Model.from_pyro(program, x=x, batch_size=batch_size, name=name)


def vae_digits(
    *,
    latent_dim: int = 4,
    hidden: int = 64,
    batch_size: int | None = 100,
    split: str = "train",
    decoder: nn.Module | None = None,
    form: str = "tensor",
    seed: int = 0,
    dtype=None,
) -> Model:
    """A Gaussian VAE of the binarized 8x8 digits: ``z_i ~ N(0, I)``, ``x_i ~ Bernoulli(decoder(z_i))``.

    Parameters
    ----------
    latent_dim : int
        Dimension ``d`` of the code (2 to 8 suit 64 pixels).
    hidden : int
        Width of the decoder's hidden layer (``Linear(d, hidden) -> Softplus -> Linear(hidden, 64)``,
        giving the pixels' logits).
    batch_size : int or None
        Images per minibatch: the plate ``"data"`` is subsampled and ``z`` is a local site (each
        step of a fit sees ``batch_size`` images, the likelihood scaled by ``N / batch_size``);
        ``None``: every image at once.
    split : {"train", "test", "all"}
        The first 1437 images, the last 360, or all 1797 (see :func:`load_binarized_digits`).
    decoder : nn.Module, optional
        A decoder to share (e.g. the fitted one, to evaluate the test split); default a new one
        initialized from ``seed``.
    form : {"tensor", "pyro"}
        A hand-written batched log density (fast; it also exposes its per-datum terms, so
        score-function estimators get per-image costs), or the same model as a Pyro program whose
        decoder is a ``PyroModule`` attribute. They agree to float precision.
    seed : int
        Seed of the decoder's initialization.
    dtype : torch.dtype, optional

    Returns
    -------
    Model
        Site ``z [N, latent_dim]`` (real); the decoder's weights are the model's parameters
        (``decoder.<layer>.weight`` ...); ``model.decoder`` is the network. No reference
        posterior: :func:`heldout_elbo` scores a fit on the test images.

    References
    ----------
    .. [1] Kingma, D. P., Welling, M. "Auto-Encoding Variational Bayes". ICLR (2014).
    .. [2] Alpaydin, E., Kaynak, C. Optical Recognition of Handwritten Digits data set, UCI (1998),
       as bundled with scikit-learn.
    """
    if not isinstance(latent_dim, int) or latent_dim < 1:
        raise ValueError(f"latent_dim must be a positive int, got {latent_dim!r}.")
    return _build(
        "gaussian",
        split=split,
        batch_size=batch_size,
        decoder=decoder,
        form=form,
        seed=seed,
        dtype=dtype,
        shape=(latent_dim,),
        hidden=hidden,
        name="vae_digits",
    )


def categorical_vae_digits(
    *,
    codes: int = 8,
    categories: int = 10,
    hidden: int = 64,
    batch_size: int | None = 100,
    split: str = "train",
    decoder: nn.Module | None = None,
    form: str = "tensor",
    seed: int = 0,
    dtype=None,
) -> Model:
    """A categorical VAE of the binarized 8x8 digits: ``codes`` one-hot codes over ``categories`` values.

    ``z_i`` is ``codes`` independent one-hot vectors, each uniform over ``categories`` values, and
    ``x_i ~ Bernoulli(decoder(flatten(z_i)))``; the decoder is
    ``Linear(codes * categories, hidden) -> Softplus -> Linear(hidden, 64)``.

    Parameters
    ----------
    codes, categories : int
        The code: ``codes`` categorical variables of ``categories`` values (Jang et al. use 20 x 10
        on MNIST; 8 x 10 suits 64 pixels).
    hidden, batch_size, split, decoder, form, seed, dtype
        As in :func:`vae_digits`. Both forms accept relaxed (soft) one-hot codes, which
        ``GumbelSoftmax`` hands them; the uniform prior's log density is the same for any point
        of the simplex.

    Returns
    -------
    Model
        Site ``z [N, codes, categories]`` with one-hot support (``constraints.one_hot`` per code);
        the model has discrete sites: fit it with :func:`categorical_vae_digits_guide` and
        ``GumbelSoftmax`` or ``ScoreFunction``.

    References
    ----------
    .. [1] Jang, E., Gu, S., Poole, B. "Categorical Reparameterization with Gumbel-Softmax".
       ICLR (2017).
    .. [2] Mnih, A., Gregor, K. "Neural Variational Inference and Learning in Belief Networks".
       ICML (2014).
    """
    for what, v, low in (("codes", codes, 1), ("categories", categories, 2)):
        if not isinstance(v, int) or v < low:
            raise ValueError(f"{what} must be an int >= {low}, got {v!r}.")
    return _build(
        "categorical",
        split=split,
        batch_size=batch_size,
        decoder=decoder,
        form=form,
        seed=seed,
        dtype=dtype,
        shape=(codes, categories),
        hidden=hidden,
        name="categorical_vae_digits",
    )


class _Encoder(nn.Module):
    """An MLP from the image rows to the code's parameters."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def _check_vae(model, kind):
    cfg = getattr(model, "vae", None)
    if cfg is None or cfg["kind"] != kind:
        want = "vae_digits" if kind == "gaussian" else "categorical_vae_digits"
        raise ValueError(f"this guide factory is for {want} models, got model {model.name!r}.")
    return cfg


def vae_digits_guide(model: Model, *, hidden: int = 64, encoder: nn.Module | None = None, seed: int = 1):
    """The default amortized guide of :func:`vae_digits`: ``q(z_i | x_i) = N(loc(x_i), scale(x_i)^2)``.

    The encoder is ``Linear(64, hidden) -> Softplus -> Linear(hidden, 2 d)`` (loc, and the raw
    scale that ``softplus`` makes positive), initialized from ``seed``.

    Returns
    -------
    vipkg.guides.AmortizedNormal

    References
    ----------
    .. [1] Kingma, D. P., Welling, M. "Auto-Encoding Variational Bayes". ICLR (2014).
    """
    from vipkg.guides.amortized import AmortizedNormal  # models -> guides only for this factory

    cfg = _check_vae(model, "gaussian")
    if encoder is None:
        (d,) = cfg["shape"]
        encoder = _Encoder(mlp([_PIXELS, hidden, 2 * d], seed=seed, dtype=cfg["dtype"]))
    return AmortizedNormal(model, encoder, data="x")


def categorical_vae_digits_guide(
    model: Model, *, hidden: int = 64, encoder: nn.Module | None = None, seed: int = 1
):
    """The default amortized guide of :func:`categorical_vae_digits`: independent one-hot
    categoricals per code with logits ``encoder(x_i)``, the encoder
    ``Linear(64, hidden) -> Softplus -> Linear(hidden, codes * categories)``.

    Returns
    -------
    vipkg.guides.AmortizedOneHotCategorical

    References
    ----------
    .. [1] Jang, E., Gu, S., Poole, B. "Categorical Reparameterization with Gumbel-Softmax".
       ICLR (2017).
    """
    from vipkg.guides.amortized import AmortizedOneHotCategorical  # models -> guides for this factory

    cfg = _check_vae(model, "categorical")
    if encoder is None:
        encoder = _Encoder(mlp([_PIXELS, hidden, math.prod(cfg["shape"])], seed=seed, dtype=cfg["dtype"]))
    return AmortizedOneHotCategorical(model, encoder, data="x")


@torch.no_grad()
def heldout_elbo(
    model: Model, guide, *, split: str = "test", draws: int = 100, seed: int = 0, chunk: int = 25, k: int = 1
):
    """The ELBO of a fitted VAE (its decoder) and amortized guide (its encoder) on held-out images.

    The model is rebuilt on ``split`` with the same decoder and every image at once, the guide's
    encoder is applied to those images (:meth:`~vipkg.guides.amortized.Amortized.with_model`), and
    ``log p(x, z) - log q(z | x)`` is averaged over ``draws`` independent draws of every code.

    Parameters
    ----------
    model : vipkg.Model
        A model of :func:`vae_digits` or :func:`categorical_vae_digits` (e.g. ``FitResult.model``).
    guide : vipkg.guides.amortized.Amortized
        The fitted amortized family.
    split : {"test", "train", "all"}
    draws : int
        Draws of the whole set of codes; the estimate's standard error falls as ``1 / sqrt(draws)``.
    seed : int
        Seeds a forked torch RNG (the caller's stream is left as it was).
    chunk : int
        Draws evaluated at once (memory: ``chunk x k x images x 64`` logits).
    k : int
        Importance samples per image: ``k > 1`` gives each image's IWAE bound
        ``log (1/k) sum_j p(x_i, z_ij) / q(z_ij | x_i)`` (Burda et al. 2016), estimated from
        ``draws`` groups of ``k`` draws; tighter as ``k`` grows, the ELBO at ``k = 1``.

    Returns
    -------
    (float, float)
        The bound in nats per image (the mean of the per-image ELBOs), and its standard error.

    References
    ----------
    .. [1] Kingma, D. P., Welling, M. "Auto-Encoding Variational Bayes". ICLR (2014).
    """
    cfg = getattr(model, "vae", None)
    if cfg is None:
        raise ValueError(
            f"heldout_elbo takes a vae_digits or categorical_vae_digits model, got {model.name!r}."
        )
    if not callable(getattr(guide, "with_model", None)):
        raise ValueError(
            f"heldout_elbo needs an amortized guide (vipkg.guides.AmortizedNormal, ...) to encode held-out "
            f"images, got {type(guide).__name__}."
        )
    if not isinstance(draws, int) or draws < 2:
        raise ValueError(f"draws must be an int >= 2, got {draws!r}.")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int (importance samples per image), got {k!r}.")
    shape = cfg["shape"]
    kw = (
        {"latent_dim": shape[0]} if cfg["kind"] == "gaussian" else {"codes": shape[0], "categories": shape[1]}
    )
    make = vae_digits if cfg["kind"] == "gaussian" else categorical_vae_digits
    test = make(
        **kw,
        hidden=cfg["hidden"],
        batch_size=None,
        split=split,
        decoder=model.decoder,
        # Per-image weights need the per-image terms, which the tensor form has at any batch size.
        form=cfg["form"] if k == 1 else "tensor",
        dtype=guide.dtype,
    )
    q = guide.with_model(test)
    n = test.sites["z"].shape[0]
    out = []
    with seeded(seed, guide.device):
        done = 0
        while done < draws:
            c = min(chunk, draws - done)
            if k == 1:
                z, log_q = q.sample_and_log_prob((c,))
                out.append((q.log_joint(test, z) - log_q).double() / n)
            else:
                z, _ = q.sample_and_log_prob((c * k,))
                latents, _ = q.log_prob_parts(test, z)
                lp = sum(v.reshape(c * k, n, -1).sum(-1) for v in test.log_joint_terms(latents).values())
                lw = (lp - q.datum_log_prob(latents)).double().reshape(c, k, n)
                out.append((torch.logsumexp(lw, 1) - math.log(k)).mean(-1))
            done += c
    w = torch.cat(out)
    return float(w.mean()), float(w.std() / math.sqrt(w.numel()))
