"""Real Pyro programs, rewritten as fixtures, for vipkg's Pyro front-end.

Every entry of :data:`PROGRAMS` is a :class:`Program`: a name, the Pyro source it comes
from (``source``: file and test / function name in https://github.com/pyro-ppl/pyro,
mirrored at commit ff6ae1c9 of 2024-10-24), ``make()`` that returns ``(fn, args, kwargs)``
for ``vipkg.Model.from_pyro(fn, *args, **kwargs)``, and a ``kind`` tag (see :data:`TAGS`).

The programs are the sources' model functions, kept as written where that is possible;
what had to change is said in ``notes`` (smaller synthetic data instead of downloads,
shape assertions that only hold under Pyro's own enumeration removed, ...). Data are
drawn under a fixed seed with the default dtype in force when ``make()`` is called, so
``make()`` under ``torch.float64`` gives float64 programs.

The helpers at the bottom (prior draws, Pyro's log joint, ELBO estimates for a vipkg guide
and for Pyro's ``AutoNormal``) are shared by ``test_programs.py`` and
``benchmarks/bench_pyro_programs.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import math
import os
import warnings
from collections import defaultdict
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer import config_enumerate
from pyro.ops.indexing import Vindex
from pyro.poutine.plate_messenger import block_plate
from torch import nn

import vipkg

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
PYRO_COMMIT = "ff6ae1c9572591791aae8842bcd702fcf0b46fd6"

#: What a ``kind`` may combine (joined with ``+``):
#: ``continuous``: every latent site is continuous; ``discrete``: some latent site is discrete;
#: ``params``: the model reads ``pyro.param`` / ``pyro.module`` / PyroModule parameters (model-side
#: parameters, which vipkg learns with the guide); ``local_subsample``: local latent sites in a
#: subsampled plate (vectorized plates: minibatches; sequential ones, ``for i in pyro.plate(...)``, are
#: ``unsupported``: a ``vipkg.ModelError``); ``enumerate``: ``infer={"enumerate": ...}``
#: annotations (vipkg sums those sites out; with ``enumerate=False`` it warns and guides them; a program
#: whose every latent site is enumerated is ``unsupported``: nothing is left for a guide); ``unsupported``:
#: outside what vipkg fits, ``error`` / ``match`` say which error and what its message must name.
TAGS = frozenset({"continuous", "discrete", "params", "local_subsample", "enumerate", "unsupported"})


@dataclasses.dataclass(frozen=True)
class Program:
    """One Pyro program.

    Attributes
    ----------
    name : str
        Unique id (used as the pytest id).
    source : str
        ``"pyro <path>::<test or function>"`` of the original.
    make : callable
        ``make() -> (fn, args, kwargs)``; builds data under a fixed seed.
    kind : str
        Tags from :data:`TAGS` joined with ``+``.
    error : type, optional
        For ``unsupported``: the vipkg error expected from building the model, evaluating its log
        joint or fitting it.
    match : str, optional
        Regex the expected error's message must match: the site, or what to change.
    warns : dict, optional
        ``{"params" or "enumerate": regex}``: the ``UserWarning`` vipkg gives for a model-side
        parameter / an enumerate annotation under ``enumerate=False`` must match it (name the
        parameter / site); an enumerated site must match the ``enumerate`` regex too.
    subsample : bool
        The program has a subsampled plate: log joints are compared under equal torch seeds.
    fit_steps : int
        Steps for the short fit of the test suite.
    slow : bool
        Its fit comparison is too slow for the default suite.
    max_plate_nesting : int, optional
        For Pyro's vectorized ``Trace_ELBO`` (benchmark); default: inferred from a trace.
    proper : bool
        ``False`` when the posterior is improper (the ELBO is unbounded): no fit comparison.
    notes : str
        What differs from the source.
    """

    name: str
    source: str
    make: Callable[[], tuple[Callable, tuple, dict]]
    kind: str
    error: type | None = None
    match: str | None = None
    warns: dict = dataclasses.field(default_factory=dict)
    subsample: bool = False
    fit_steps: int = 200
    slow: bool = False
    max_plate_nesting: int | None = None
    proper: bool = True
    notes: str = ""

    def __post_init__(self):
        unknown = self.tags - TAGS
        if unknown:
            raise ValueError(f"program {self.name!r}: unknown tag(s) {sorted(unknown)}")
        if ("continuous" in self.tags) == ("discrete" in self.tags):
            raise ValueError(f"program {self.name!r} must be tagged exactly one of continuous / discrete")
        if self.expects_error and self.error is None:
            raise ValueError(f"program {self.name!r}: unsupported needs error=")
        if not self.expects_error and set(self.warns) != self.tags & {"params", "enumerate"}:
            raise ValueError(f"program {self.name!r}: warns= needs one regex per params / enumerate tag")

    @property
    def tags(self) -> frozenset[str]:
        return frozenset(self.kind.split("+"))

    @property
    def expects_error(self) -> bool:
        return "unsupported" in self.tags

    @property
    def is_continuous(self) -> bool:
        return "continuous" in self.tags


PROGRAMS: list[Program] = []


def program(name, source, kind, **kw):
    """Register ``make`` (the decorated function) as a :class:`Program`."""

    def deco(make):
        PROGRAMS.append(Program(name=name, source=source, make=make, kind=kind, **kw))
        return make

    return deco


@contextlib.contextmanager
def seeded(seed: int):
    """Data are drawn under a forked, seeded torch RNG (the caller's stream is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


VALID = "pyro tests/infer/test_valid_models.py::"
HMC = "pyro tests/infer/mcmc/test_hmc.py::"
NUTS = "pyro tests/infer/mcmc/test_nuts.py::"
SUBSAMPLE_ERROR = r"subsampled( sequential)? plate"


# =====================================================================================
# tests/infer/test_valid_models.py
# =====================================================================================


@program(
    "nonempty_model_empty_guide",
    VALID + "test_nonempty_model_empty_guide_ok",
    "continuous+unsupported",
    error=vipkg.ModelError,
    match="no latent",
)
def _():
    def model():
        loc = torch.tensor([0.0, 0.0])
        scale = torch.tensor([1.0, 1.0])
        pyro.sample("x", dist.Normal(loc, scale).to_event(1), obs=loc)

    return model, (), {}


@program(
    "factor_in_model",
    VALID + "test_factor_in_model_ok",
    "continuous+unsupported",
    error=vipkg.ModelError,
    match="no latent",
)
def _():
    def model():
        pyro.factor("f", torch.tensor(0.0))

    return model, (), {}


@program("set_has_rsample", VALID + "test_set_has_rsample_ok", "continuous")
def _():
    def model():
        z = pyro.sample("z", dist.Normal(0, 1))
        loc = (z * 100).clamp(min=0, max=1)  # sparse gradients
        pyro.sample("x", dist.Normal(loc, 1), obs=torch.tensor(0.0))

    return model, (), {}


@program("not_has_rsample", VALID + "test_not_has_rsample_ok", "continuous")
def _():
    def model():
        z = pyro.sample("z", dist.Normal(0, 1))
        p = z.round().clamp(min=0.2, max=0.8)  # discontinuous
        pyro.sample("x", dist.Bernoulli(p), obs=torch.tensor(0.0))

    return model, (), {}


@program("iplate_full", VALID + "test_iplate_ok[full]", "discrete")
def _():
    def model():
        p = torch.tensor(0.5)
        for i in pyro.plate("plate", 4, None):
            pyro.sample(f"x_{i}", dist.Bernoulli(p))

    return model, (), {}


@program(
    "iplate_subsample",
    VALID + "test_iplate_ok[subsample]",
    "discrete+local_subsample+unsupported",
    error=vipkg.ModelError,
    match=rf"x_\d.*{SUBSAMPLE_ERROR}",
    subsample=True,
    notes="sequential plate of 4 subsampled to 2: the site names themselves are random",
)
def _():
    def model():
        p = torch.tensor(0.5)
        for i in pyro.plate("plate", 4, 2):
            pyro.sample(f"x_{i}", dist.Bernoulli(p))

    return model, (), {}


@program("plate_full", VALID + "test_plate_ok[full]", "discrete")
def _():
    def model():
        p = torch.tensor(0.5)
        with pyro.plate("plate", 10, None) as ind:
            pyro.sample("x", dist.Bernoulli(p).expand_by([len(ind)]))

    return model, (), {}


@program(
    "plate_subsample",
    VALID + "test_plate_ok[subsample]",
    "discrete+local_subsample",
    subsample=True,
)
def _():
    def model():
        p = torch.tensor(0.5)
        with pyro.plate("plate", 10, 5) as ind:
            pyro.sample("x", dist.Bernoulli(p).expand_by([len(ind)]))

    return model, (), {}


@program("plate_subsample_param_full", VALID + "test_plate_subsample_param_ok[full]", "discrete")
def _():
    def model():
        p = torch.tensor(0.5)
        with pyro.plate("plate", 10, None):
            pyro.sample("x", dist.Bernoulli(p))

    return model, (), {}


@program("plate_no_size", VALID + "test_plate_no_size_ok", "discrete")
def _():
    def model():
        p = torch.tensor(0.5)
        with pyro.plate("plate"):
            pyro.sample("x", dist.Bernoulli(p).expand_by([10]))

    return model, (), {}


@program("iplate_iplate_full", VALID + "test_iplate_iplate_ok[full]", "discrete")
def _():
    def model():
        p = torch.tensor(0.5)
        outer_iplate = pyro.plate("plate_0", 3, None)
        inner_iplate = pyro.plate("plate_1", 3, None)
        for i in outer_iplate:
            for j in inner_iplate:
                pyro.sample(f"x_{i}_{j}", dist.Bernoulli(p))

    return model, (), {}


@program(
    "iplate_in_model_not_guide_subsample",
    VALID + "test_iplate_in_model_not_guide_ok[subsample]",
    "discrete",
    subsample=True,
    notes="an empty sequential plate of 10 subsampled to 5, then one Bernoulli site",
)
def _():
    def model():
        p = torch.tensor(0.5)
        for _ in pyro.plate("plate", 10, 5):
            pass
        pyro.sample("x", dist.Bernoulli(p))

    return model, (), {}


@program(
    "plate_iplate",
    VALID + "test_plate_iplate_ok",
    "discrete+local_subsample+unsupported",
    error=vipkg.ModelError,
    match=rf"x_\d.*{SUBSAMPLE_ERROR}",
    subsample=True,
)
def _():
    def model():
        p = torch.tensor(0.5)
        with pyro.plate("plate", 3, 2) as ind:
            for i in pyro.plate("iplate", 3, 2):
                pyro.sample(f"x_{i}", dist.Bernoulli(p).expand_by([len(ind)]))

    return model, (), {}


@program("plate_stack", VALID + "test_plate_stack_ok[sizes2]", "discrete", notes="sizes (3, 4, 5)")
def _():
    def model():
        p = torch.tensor(0.5)
        with pyro.plate_stack("plate_stack", (3, 4, 5)):
            pyro.sample("x", dist.Bernoulli(p))

    return model, (), {}


@program(
    "plate_stack_and_plate", VALID + "test_plate_stack_and_plate_ok[sizes1]", "discrete", notes="sizes (3, 4)"
)
def _():
    def model():
        p = torch.tensor(0.5)
        with pyro.plate_stack("plate_stack", (3, 4)):
            with pyro.plate("plate", 7):
                pyro.sample("x", dist.Bernoulli(p))

    return model, (), {}


@program(
    "nested_plate_plate",
    VALID + "test_nested_plate_plate_ok",
    "discrete+local_subsample",
    subsample=True,
)
def _():
    def model():
        p = torch.tensor(0.5)
        with pyro.plate("plate_outer", 10, 5) as ind_outer:
            pyro.sample("x", dist.Bernoulli(p).expand_by([len(ind_outer)]))
            with pyro.plate("plate_inner", 11, 6) as ind_inner:
                pyro.sample("y", dist.Bernoulli(p).expand_by([len(ind_inner), len(ind_outer)]))

    return model, (), {}


@program(
    "plate_reuse",
    VALID + "test_plate_reuse_ok",
    "discrete+local_subsample",
    subsample=True,
)
def _():
    def model():
        p = torch.tensor(0.5)
        plate_outer = pyro.plate("plate_outer", 10, 5, dim=-1)
        plate_inner = pyro.plate("plate_inner", 11, 6, dim=-2)
        with plate_outer as ind_outer:
            pyro.sample("x", dist.Bernoulli(p).expand_by([len(ind_outer)]))
        with plate_inner as ind_inner:
            pyro.sample("y", dist.Bernoulli(p).expand_by([len(ind_inner), 1]))
        with plate_outer as ind_outer, plate_inner as ind_inner:
            pyro.sample("z", dist.Bernoulli(p).expand_by([len(ind_inner), len(ind_outer)]))

    return model, (), {}


@program(
    "three_indep_plate_at_different_depths",
    VALID + "test_three_indep_plate_at_different_depths_ok",
    "discrete+local_subsample",
    subsample=True,
)
def _():
    def model():
        p = torch.tensor(0.5)
        inner_plate = pyro.plate("plate2", 10, 5)
        for i in pyro.plate("plate0", 2):
            pyro.sample(f"x_{i}", dist.Bernoulli(p))
            if i == 0:
                for j in pyro.plate("plate1", 2):
                    with inner_plate as ind:
                        pyro.sample(f"y_{j}", dist.Bernoulli(p).expand_by([len(ind)]))
            elif i == 1:
                with inner_plate as ind:
                    pyro.sample("z", dist.Bernoulli(p).expand_by([len(ind)]))

    return model, (), {}


@program(
    "block_plate_name",
    VALID + "test_block_plate_name_ok",
    "continuous",
    notes="kept the source's shape assertions (a user program that checks its own shapes)",
)
def _():
    def model():
        a = pyro.sample("a", dist.Normal(0, 1))
        assert a.shape == ()
        with pyro.plate("plate", 2):
            b = pyro.sample("b", dist.Normal(0, 1))
            assert b.shape == (2,)
            with block_plate("plate"):
                c = pyro.sample("c", dist.Normal(0, 1))
                assert c.shape == ()

    return model, (), {}


@program("block_plate_dim", VALID + "test_block_plate_dim_ok", "continuous", notes="shape assertions kept")
def _():
    def model():
        a = pyro.sample("a", dist.Normal(0, 1))
        assert a.shape == ()
        with pyro.plate("plate", 2):
            b = pyro.sample("b", dist.Normal(0, 1))
            assert b.shape == (2,)
            with block_plate(dim=-1):
                c = pyro.sample("c", dist.Normal(0, 1))
                assert c.shape == ()

    return model, (), {}


@program("enum_discrete_single_single", VALID + "test_enum_discrete_single_single_ok", "discrete")
def _():
    def model():
        p = torch.tensor(0.5)
        pyro.sample("x", dist.Bernoulli(p))
        pyro.sample("y", dist.Bernoulli(p))

    return model, (), {}


@program(
    "enum_discrete_iplate_single",
    VALID + "test_enum_discrete_iplate_single_ok",
    "discrete+local_subsample+unsupported",
    error=vipkg.ModelError,
    match=rf"x_\d.*{SUBSAMPLE_ERROR}",
    subsample=True,
)
def _():
    def model():
        p = torch.tensor(0.5)
        for i in pyro.plate("plate", 10, 5):
            pyro.sample(f"x_{i}", dist.Bernoulli(p))

    return model, (), {}


@program(
    "plate_enum_discrete_no_discrete_vars",
    VALID + "test_plate_enum_discrete_no_discrete_vars_warning",
    "continuous+local_subsample",
    subsample=True,
)
def _():
    def model():
        loc = torch.tensor(0.0)
        scale = torch.tensor(1.0)
        with pyro.plate("plate", 10, 5) as ind:
            pyro.sample("x", dist.Normal(loc, scale).expand_by([len(ind)]))

    return model, (), {}


@program(
    "enum_discrete_parallel_nested",
    VALID + "test_enum_discrete_parallel_nested_ok[inf]",
    "discrete+enumerate+unsupported",
    error=vipkg.ModelError,
    match=r"every latent site is enumerated",
    warns={"enumerate": "x2"},
    notes="config_enumerate(model, 'parallel') as in the source's guide",
)
def _():
    def model():
        p2 = torch.ones(2) / 2
        p3 = torch.ones(3) / 3
        pyro.sample("x2", dist.OneHotCategorical(p2))
        pyro.sample("x3", dist.OneHotCategorical(p3))

    return config_enumerate(model, "parallel"), (), {}


@program(
    "enumerate_parallel_plate",
    VALID + "test_enumerate_parallel_plate_ok[parallel-True-None]",
    "discrete+enumerate+unsupported",
    error=vipkg.ModelError,
    match=r"every latent site is enumerated",
    warns={"enumerate": "x536"},
    notes="config_enumerate(model, 'parallel', expand=True); the shape checks of Pyro's enumeration removed",
)
def _():
    def model():
        p2 = torch.ones(2) / 2
        p34 = torch.ones(3, 4) / 4
        p536 = torch.ones(5, 3, 6) / 6
        pyro.sample("x2", dist.Categorical(p2))
        with pyro.plate("outer", 3):
            pyro.sample("x34", dist.Categorical(p34))
            with pyro.plate("inner", 5):
                pyro.sample("x536", dist.Categorical(p536))

    return config_enumerate(model, "parallel", expand=True), (), {}


@program(
    "enum_discrete_plate_dependency",
    VALID + "test_enum_discrete_plate_dependency_warning",
    "discrete+enumerate+local_subsample+unsupported",
    error=vipkg.ModelError,
    match=r"(?s)cannot be enumerated.*common poutine.scale",
    warns={"enumerate": "'w'"},
    subsample=True,
)
def _():
    def model():
        pyro.sample("w", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
        with pyro.plate("plate", 10, 5):
            x = pyro.sample("x", dist.Bernoulli(0.5).expand_by([5]), infer={"enumerate": "parallel"})
        pyro.sample("y", dist.Bernoulli(x.mean()))  # user should move this line up

    return model, (), {}


@program(
    "enum_discrete_non_enumerated_plate",
    VALID + "test_enum_discrete_non_enumerated_plate_ok[parallel]",
    "discrete+enumerate",
    warns={"enumerate": "'w'"},
    notes="`a.size(0)` is the plate size in the source: not vectorizable over a leading particle dim",
)
def _():
    def model():
        pyro.sample("w", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
        with pyro.plate("non_enum", 2):
            a = pyro.sample("a", dist.Bernoulli(0.5).expand_by([2]), infer={"enumerate": None})
        p = (1.0 + a.sum(-1)) / (2.0 + a.size(0))  # introduce dependency of b on a
        with pyro.plate("enum_1", 3):
            pyro.sample("b", dist.Bernoulli(p).expand_by([3]), infer={"enumerate": "parallel"})

    return model, (), {}


@program(
    "plate_shape_broadcasting",
    VALID + "test_plate_shape_broadcasting",
    "continuous",
    notes="the model's own size-10 plate at dim -3; shape assertion removed (10 x 1 x 2 holds only there)",
    slow=True,
)
def _():
    data = torch.ones(1000, 2)

    def model():
        with pyro.plate("num_particles", 10, dim=-3):
            with pyro.plate("components", 2, dim=-1):
                p = pyro.sample("p", dist.Beta(torch.tensor(1.1), torch.tensor(1.1)))
            with pyro.plate("data", data.shape[0], dim=-2):
                pyro.sample("obs", dist.Bernoulli(p), obs=data)

    return model, (), {}


@program(
    "vectorized_num_particles",
    VALID + "test_vectorized_num_particles",
    "continuous",
    notes="`assert p.shape == (10, 1, 2)` removed: it holds only under Pyro's 10 vectorized particles",
)
def _():
    data = torch.ones(1000, 2)

    def model():
        with pyro.plate("components", 2):
            p = pyro.sample("p", dist.Beta(torch.tensor(1.1), torch.tensor(1.1)))
            with pyro.plate("data", data.shape[0]):
                pyro.sample("obs", dist.Bernoulli(p), obs=data)

    return model, (), {}


@program(
    "enum_in_model",
    VALID + "test_enum_in_model_ok",
    "discrete+params+enumerate",
    warns={"params": "'p'", "enumerate": "'c'"},
    notes="shape checks of Pyro's enumeration removed",
)
def _():
    infer = {"enumerate": "parallel"}

    def model():
        p = pyro.param("p", torch.tensor(0.25))
        a = pyro.sample("a", dist.Bernoulli(p))
        b = pyro.sample("b", dist.Bernoulli(p + a / 2))
        c = pyro.sample("c", dist.Bernoulli(p + b / 2), infer=infer)
        d = pyro.sample("d", dist.Bernoulli(p + c / 2))
        e = pyro.sample("e", dist.Bernoulli(p + d / 2))
        f = pyro.sample("f", dist.Bernoulli(p + e / 2), infer=infer)
        pyro.sample("g", dist.Bernoulli(p + f / 2), obs=torch.tensor(0.0))

    return model, (), {}


@program(
    "enum_in_model_plate",
    VALID + "test_enum_in_model_plate_ok",
    "discrete+params+enumerate",
    warns={"params": "'p'", "enumerate": "'c'"},
    notes="shape checks of Pyro's enumeration removed",
)
def _():
    infer = {"enumerate": "parallel"}

    def model():
        p = pyro.param("p", torch.tensor(0.25))
        a = pyro.sample("a", dist.Bernoulli(p))
        b = pyro.sample("b", dist.Bernoulli(p + a / 2))
        with pyro.plate("data", 3):
            c = pyro.sample("c", dist.Bernoulli(p + b / 2), infer=infer)
            d = pyro.sample("d", dist.Bernoulli(p + c / 2))
            e = pyro.sample("e", dist.Bernoulli(p + d / 2))
            f = pyro.sample("f", dist.Bernoulli(p + e / 2), infer=infer)
            pyro.sample("g", dist.Bernoulli(p + f / 2), obs=torch.zeros(3))

    return model, (), {}


@program(
    "enum_in_model_plate_reuse",
    VALID + "test_enum_in_model_plate_reuse_ok",
    "discrete+params+enumerate+unsupported",
    error=vipkg.ModelError,
    match=r"every latent site is enumerated",
    warns={"params": "'p'", "enumerate": "'a'"},
)
def _():
    @config_enumerate
    def model():
        p = pyro.param("p", torch.tensor([0.2, 0.8]))
        a = pyro.sample("a", dist.Bernoulli(0.3)).long()
        with pyro.plate("b_axis", 2):
            pyro.sample("b", dist.Bernoulli(p[a]), obs=torch.tensor([0.0, 1.0]))
        c = pyro.sample("c", dist.Bernoulli(0.3)).long()
        with pyro.plate("c_axis", 2):
            pyro.sample("d", dist.Bernoulli(p[c]), obs=torch.tensor([0.0, 0.0]))

    return model, (), {}


@program(
    "enum_recycling_chain",
    VALID + "test_enum_recycling_chain",
    "discrete+params+enumerate+unsupported",
    error=vipkg.ModelError,
    match=r"every latent site is enumerated",
    warns={"params": "'p'", "enumerate": "x_0"},
)
def _():
    @config_enumerate
    def model():
        p = pyro.param("p", torch.tensor([[0.2, 0.8], [0.1, 0.9]]))
        x = 0
        for t in pyro.markov(range(100)):
            x = pyro.sample(f"x_{t}", dist.Categorical(p[x]))

    return model, (), {}


@program(
    "enum_recycling_dbn",
    VALID + "test_enum_recycling_dbn[True-False]",
    "discrete+params+enumerate+unsupported",
    error=vipkg.ModelError,
    match=r"every latent site is enumerated",
    warns={"params": "'r'", "enumerate": "x_0"},
    notes="markov=False (11 steps), use_vindex=True",
)
def _():
    @config_enumerate
    def model():
        p = pyro.param("p", torch.ones(3, 3))
        q = pyro.param("q", torch.ones(2))
        r = pyro.param("r", torch.ones(3, 2, 4))
        x = 0
        for t in range(11):
            x = pyro.sample(f"x_{t}", dist.Categorical(p[x]))
            y = pyro.sample(f"y_{t}", dist.Categorical(q))
            probs = Vindex(r)[x, y]
            pyro.sample(f"z_{t}", dist.Categorical(probs), obs=torch.tensor(0.0))

    return model, (), {}


@program(
    "enum_recycling_nested",
    VALID + "test_enum_recycling_nested",
    "discrete+params+enumerate+unsupported",
    error=vipkg.ModelError,
    match=r"every latent site is enumerated",
    warns={"params": "'p'", "enumerate": "'x'"},
)
def _():
    @config_enumerate
    def model():
        p = pyro.param("p", torch.ones(3, 3))
        x = pyro.sample("x", dist.Categorical(p[0]))
        y = x
        for i in pyro.markov(range(10)):
            y = pyro.sample(f"y_{i}", dist.Categorical(p[y]))
            z = y
            for j in pyro.markov(range(10)):
                z = pyro.sample(f"z_{i}_{j}", dist.Categorical(p[z]))

    return model, (), {}


@program(
    "enum_recycling_grid",
    VALID + "test_enum_recycling_grid[True]",
    "discrete+params+enumerate+unsupported",
    error=vipkg.ModelError,
    match=r"every latent site is enumerated",
    warns={"params": "p_leaf", "enumerate": "x_0_0"},
    notes="use_vindex=True",
)
def _():
    @config_enumerate
    def model():
        p = pyro.param("p_leaf", torch.ones(2, 2, 2))
        x = defaultdict(lambda: torch.tensor(0))
        y_axis = pyro.markov(range(4), keep=True)
        for i in pyro.markov(range(4)):
            for j in y_axis:
                probs = Vindex(p)[x[i - 1, j], x[i, j - 1]]
                x[i, j] = pyro.sample(f"x_{i}_{j}", dist.Categorical(probs))

    return model, (), {}


@program(
    "enum_recycling_reentrant",
    VALID + "test_enum_recycling_reentrant",
    "discrete+params+enumerate+unsupported",
    error=vipkg.ModelError,
    match=r"every latent site is enumerated",
    warns={"params": "p_branch", "enumerate": "branch_a"},
    notes="3 levels of the source's 5-fold nested data tuple",
)
def _():
    data = (True, False)
    for _ in range(3):
        data = (data, data, False)

    @pyro.markov
    def model(data, state=0, address=""):
        if isinstance(data, bool):
            p = pyro.param("p_leaf", torch.ones(10))
            pyro.sample(f"leaf_{address}", dist.Bernoulli(p[state]), obs=torch.tensor(1.0 if data else 0.0))
        else:
            p = pyro.param("p_branch", torch.ones(10, 10))
            for branch, letter in zip(data, "abcdefg"):
                next_state = pyro.sample(
                    f"branch_{address + letter}",
                    dist.Categorical(p[state]),
                    infer={"enumerate": "parallel"},
                )
                model(branch, next_state, address + letter)

    return model, (data,), {}


@program(
    "enum_recycling_plate",
    VALID + "test_enum_recycling_plate",
    "discrete+params+enumerate+unsupported",
    error=vipkg.ModelError,
    match=r"every latent site is enumerated",
    warns={"params": "'q'", "enumerate": "'a'"},
)
def _():
    @config_enumerate
    def model():
        p = pyro.param("p", torch.ones(3, 3))
        q = pyro.param("q", torch.tensor([0.5, 0.5]))
        plate_x = pyro.plate("plate_x", 2, dim=-1)
        plate_y = pyro.plate("plate_y", 3, dim=-1)
        plate_z = pyro.plate("plate_z", 4, dim=-2)

        a = pyro.sample("a", dist.Bernoulli(q[0])).long()
        w = 0
        for i in pyro.markov(range(5)):
            w = pyro.sample(f"w_{i}", dist.Categorical(p[w]))

        with plate_x:
            b = pyro.sample("b", dist.Bernoulli(q[a])).long()
            x = 0
            for i in pyro.markov(range(6)):
                x = pyro.sample(f"x_{i}", dist.Categorical(p[x]))

        with plate_y:
            c = pyro.sample("c", dist.Bernoulli(q[a])).long()
            y = 0
            for i in pyro.markov(range(7)):
                y = pyro.sample(f"y_{i}", dist.Categorical(p[y]))

        with plate_z:
            d = pyro.sample("d", dist.Bernoulli(q[a])).long()
            z = 0
            for i in pyro.markov(range(8)):
                z = pyro.sample(f"z_{i}", dist.Categorical(p[z]))

        with plate_x, plate_z:
            e = pyro.sample("e", dist.Bernoulli(q[b])).long()
            xz = 0
            for i in pyro.markov(range(9)):
                xz = pyro.sample(f"xz_{i}", dist.Categorical(p[xz]))

        return a, b, c, d, e

    return model, (), {}


@program(
    "markov_history",
    VALID + "test_markov_history[2]",
    "discrete+params+enumerate+unsupported",
    error=vipkg.ModelError,
    match=r"every latent site is enumerated",
    warns={"params": "'q'", "enumerate": "x_0"},
    notes="history=2 (the valid cases are history >= 2)",
)
def _():
    @config_enumerate
    def model():
        p = pyro.param("p", 0.25 * torch.ones(2, 2))
        q = pyro.param("q", 0.25 * torch.ones(2))
        x_prev = torch.tensor(0)
        x_curr = torch.tensor(0)
        for t in pyro.markov(range(10), history=2):
            probs = p[x_prev, x_curr]
            x_prev, x_curr = x_curr, pyro.sample(f"x_{t}", dist.Bernoulli(probs)).long()
            pyro.sample(f"y_{t}", dist.Bernoulli(q[x_curr]), obs=torch.tensor(0.0))

    return model, (), {}


@program("mean_field", VALID + "test_mean_field_ok", "continuous")
def _():
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(x, 1.0))

    return model, (), {}


@program(
    "mean_field_mask",
    VALID + "test_mean_field_mask_ok[False]",
    "continuous",
    proper=False,
    notes="mask=False drops x's prior: the joint is improper (flat in x), so no fit comparison",
)
def _():
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0).mask(False))
        pyro.sample("y", dist.Normal(x, 1.0))

    return model, (), {}


@program("tail_adaptive_plate", VALID + "test_tail_adaptive_ok (plate_model)", "continuous")
def _():
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        with pyro.plate("observe_data"):
            pyro.sample("obs", dist.Normal(x, 1.0), obs=torch.arange(5).type_as(x))

    return model, (), {}


@program("reparam", VALID + "test_reparam_ok", "continuous")
def _():
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(x, 1.0), obs=torch.tensor(0.0))

    return model, (), {}


@program(
    "reparam_mask", VALID + "test_reparam_mask_ok[mask3]", "continuous", notes="mask=torch.tensor(False)"
)
def _():
    mask = torch.tensor(False)

    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        with poutine.mask(mask=mask):
            pyro.sample("y", dist.Normal(x, 1.0), obs=torch.tensor(0.0))

    return model, (), {}


@program(
    "reparam_mask_plate",
    VALID + "test_reparam_mask_plate_ok[mask4]",
    "continuous",
    notes="mask=torch.tensor([False, True])",
)
def _():
    mask = torch.tensor([False, True])
    with seeded(0):
        data = torch.randn(2, 3).exp()
    data /= data.sum(-1, keepdim=True)

    def model():
        c = pyro.sample("c", dist.LogNormal(0.0, 1.0).expand([3]).to_event(1))
        with pyro.plate("data", len(data)), poutine.mask(mask=mask):
            pyro.sample("obs", dist.Dirichlet(c), obs=data)

    return model, (), {}


@program(
    "obs_mask",
    VALID + "test_obs_mask_ok[mask4]",
    "continuous",
    notes="mask=torch.tensor([False, True, False]): the missing entries are a latent site y_unobserved",
)
def _():
    data = torch.tensor([7.0, 7.0, 7.0])
    mask = torch.tensor([False, True, False])

    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        with pyro.plate("plate", len(data)):
            pyro.sample("y", dist.Normal(x, 1.0), obs=data, obs_mask=mask)

    return model, (), {}


@program(
    "obs_mask_multivariate",
    VALID + "test_obs_mask_multivariate_ok[mask4]",
    "continuous",
    notes="mask=torch.tensor([False, True, True, False])",
)
def _():
    data = torch.full((4, 3), 7.0)
    mask = torch.tensor([False, True, True, False])

    def model():
        x = pyro.sample("x", dist.MultivariateNormal(torch.zeros(3), torch.eye(3)))
        with pyro.plate("plate", len(data)):
            pyro.sample("y", dist.MultivariateNormal(x, torch.eye(3)), obs=data, obs_mask=mask)

    return model, (), {}


@program("reparam_scale", VALID + "test_reparam_scale_ok[0.1]", "continuous", notes="scale=0.1")
def _():
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        with poutine.scale(scale=0.1):
            pyro.sample("y", dist.Normal(x, 1.0), obs=torch.tensor(0.0))

    return model, (), {}


@program(
    "reparam_scale_plate",
    VALID + "test_reparam_scale_plate_ok[scale3]",
    "continuous",
    notes="scale=torch.tensor([0.1, 0.9])",
)
def _():
    scale = torch.tensor([0.1, 0.9])
    with seeded(1):
        data = torch.randn(2, 3).exp()
    data /= data.sum(-1, keepdim=True)

    def model():
        c = pyro.sample("c", dist.LogNormal(0.0, 1.0).expand([3]).to_event(1))
        with pyro.plate("data", len(data)), poutine.scale(scale=scale):
            pyro.sample("obs", dist.Dirichlet(c), obs=data)

    return model, (), {}


@program(
    "stable_likelihood",
    VALID + "test_no_log_prob_ok",
    "continuous",
    notes="a Stable likelihood; the source fits it with EnergyDistance, Pyro 1.9's Stable.log_prob "
    "integrates "
    "numerically, so the log joint exists",
    slow=True,
)
def _():
    with seeded(2):
        data = torch.randn(10)

    def model(data):
        loc = pyro.sample("loc", dist.Normal(0, 1))
        scale = pyro.sample("scale", dist.LogNormal(0, 1))
        with pyro.plate("data", len(data)):
            pyro.sample("obs", dist.Stable(1.5, 0.5, scale, loc), obs=data)

    return model, (data,), {}


@program("reparam_stable", VALID + "test_reparam_stable", "continuous", slow=True)
def _():
    from pyro.infer.reparam import LatentStableReparam

    @poutine.reparam(config={"z": LatentStableReparam()})
    def model():
        stability = pyro.sample("stability", dist.Uniform(0.0, 2.0))
        skew = pyro.sample("skew", dist.Uniform(-1.0, 1.0))
        y = pyro.sample("z", dist.Stable(stability, skew))
        pyro.sample("x", dist.Poisson(y.abs()), obs=torch.tensor(1.0))

    return model, (), {}


@program("ordered_logistic_plate", VALID + "test_ordered_logistic_plate", "continuous")
def _():
    N, K = 5, 4
    with seeded(3):
        data = (K * torch.rand(N)).long().to(torch.get_default_dtype())

    def model():
        predictor = pyro.sample("predictor", dist.Normal(0.0, 1.0).expand([N]).to_event(1))
        cutpoints = pyro.sample("cutpoints", dist.Normal(0.0, 1.0).expand([K - 1]).to_event(1))
        cutpoints = torch.sort(cutpoints, dim=-1).values
        with pyro.plate("obs_plate", N):
            pyro.sample("obs", dist.OrderedLogistic(predictor, cutpoints), obs=data)

    return model, (), {}


# =====================================================================================
# tests/infer/mcmc/test_hmc.py, test_nuts.py: plate-less models
# =====================================================================================


class GaussianChain:
    """``GaussianChain`` of tests/infer/mcmc/test_hmc.py (loc_1 -> ... -> loc_n -> obs)."""

    def __init__(self, dim, chain_len, num_obs):
        self.dim = dim
        self.chain_len = chain_len
        self.num_obs = num_obs
        self.loc_0 = torch.zeros(self.dim)
        self.lambda_prec = torch.ones(self.dim)

    def model(self, data):
        loc = self.loc_0
        lambda_prec = self.lambda_prec
        for i in range(1, self.chain_len + 1):
            loc = pyro.sample(f"loc_{i}", dist.Normal(loc=loc, scale=lambda_prec))
        pyro.sample("obs", dist.Normal(loc, lambda_prec), obs=data)

    @property
    def data(self):
        return torch.ones(self.num_obs, self.dim)


@program(
    "gaussian_chain",
    HMC + "test_hmc_conjugate_gaussian (GaussianChain.model)",
    "continuous",
    notes="dim=5, chain_len=3, num_obs=10",
)
def _():
    chain = GaussianChain(dim=5, chain_len=3, num_obs=10)
    return chain.model, (chain.data,), {}


@program(
    "hmc_logistic_regression",
    HMC + "test_logistic_regression",
    "continuous+params",
    warns={"params": "coefs_mean"},
    notes="200 data points instead of 2000",
)
def _():
    dim = 3
    with seeded(4):
        data = torch.randn(200, dim)
        true_coefs = torch.arange(1.0, dim + 1.0)
        labels = dist.Bernoulli(logits=(true_coefs * data).sum(-1)).sample()

    def model(data):
        coefs_mean = pyro.param("coefs_mean", torch.zeros(dim))
        coefs = pyro.sample("beta", dist.Normal(coefs_mean, torch.ones(dim)))
        y = pyro.sample("y", dist.Bernoulli(logits=(coefs * data).sum(-1)), obs=labels)
        return y

    return model, (data,), {}


@program(
    "hmc_dirichlet_categorical", HMC + "test_dirichlet_categorical", "continuous", notes="200 data points"
)
def _():
    with seeded(5):
        data = dist.Categorical(torch.tensor([0.1, 0.6, 0.3])).sample(torch.Size((200,)))

    def model(data):
        concentration = torch.tensor([1.0, 1.0, 1.0])
        p_latent = pyro.sample("p_latent", dist.Dirichlet(concentration))
        pyro.sample("obs", dist.Categorical(p_latent), obs=data)
        return p_latent

    return model, (data,), {}


@program(
    "hmc_beta_bernoulli",
    HMC + "test_beta_bernoulli",
    "continuous",
    max_plate_nesting=2,
    notes="200 data points",
)
def _():
    with seeded(6):
        data = dist.Bernoulli(torch.tensor([0.9, 0.1])).sample(torch.Size((200,)))

    def model(data):
        alpha = torch.tensor([1.1, 1.1])
        beta = torch.tensor([1.1, 1.1])
        p_latent = pyro.sample("p_latent", dist.Beta(alpha, beta))
        with pyro.plate("data", data.shape[0], dim=-2):
            pyro.sample("obs", dist.Bernoulli(p_latent), obs=data)
        return p_latent

    return model, (data,), {}


@program("hmc_gamma_normal", HMC + "test_gamma_normal", "continuous", notes="200 data points")
def _():
    with seeded(7):
        data = dist.Normal(3, torch.tensor([0.5, 2.0])).sample(torch.Size((200,)))

    def model(data):
        rate = torch.tensor([1.0, 1.0])
        concentration = torch.tensor([1.0, 1.0])
        p_latent = pyro.sample("p_latent", dist.Gamma(rate, concentration))
        pyro.sample("obs", dist.Normal(3, p_latent), obs=data)
        return p_latent

    return model, (data,), {}


@program(
    "hmc_bernoulli_latent",
    HMC + "test_bernoulli_latent_model",
    "discrete",
    notes="100 data points instead of 2000",
)
def _():
    N = 100
    with seeded(8):
        y = dist.Bernoulli(torch.tensor(0.3)).sample(torch.Size((N,)))
        z = dist.Bernoulli(0.65 * y + 0.1).sample()
        data = dist.Normal(2.0 * z, 1.0).sample()

    def model(data):
        y_prob = pyro.sample("y_prob", dist.Beta(1.0, 1.0))
        y = pyro.sample("y", dist.Bernoulli(y_prob))
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.65 * y + 0.1))
            pyro.sample("obs", dist.Normal(2.0 * z, 1.0), obs=data)
        pyro.sample("nuisance", dist.Bernoulli(0.3))

    return model, (data,), {}


@program("nuts_gamma_beta", NUTS + "test_gamma_beta", "continuous", notes="500 data points instead of 5000")
def _():
    with seeded(9):
        data = dist.Beta(concentration1=torch.tensor(5.0), concentration0=torch.tensor(1.0)).sample(
            torch.Size((500,))
        )

    def model(data):
        alpha_prior = pyro.sample("alpha", dist.Gamma(concentration=1.0, rate=1.0))
        beta_prior = pyro.sample("beta", dist.Gamma(concentration=1.0, rate=1.0))
        pyro.sample("x", dist.Beta(concentration1=alpha_prior, concentration0=beta_prior), obs=data)

    return model, (data,), {}


@program(
    "nuts_gaussian_mixture",
    NUTS + "test_gaussian_mixture_model",
    "discrete",
    notes="100 data points; `cluster_means[assignments]` indexes the leading dim: not vectorizable",
)
def _():
    K, N = 3, 100
    with seeded(10):
        true_cluster_means = torch.tensor([1.0, 5.0, 10.0])
        assignments = dist.Categorical(torch.tensor([0.1, 0.3, 0.6])).sample(torch.Size((N,)))
        data = dist.Normal(true_cluster_means[assignments], 1.0).sample()

    def gmm(data):
        mix_proportions = pyro.sample("phi", dist.Dirichlet(torch.ones(K)))
        with pyro.plate("num_clusters", K):
            cluster_means = pyro.sample("cluster_means", dist.Normal(torch.arange(float(K)), 1.0))
        with pyro.plate("data", data.shape[0]):
            assignments = pyro.sample("assignments", dist.Categorical(mix_proportions))
            pyro.sample("obs", dist.Normal(cluster_means[assignments], 1.0), obs=data)
        return cluster_means

    return gmm, (data,), {}


@program(
    "nuts_bernoulli_latent",
    NUTS + "test_bernoulli_latent_model",
    "discrete",
    notes="100 data points; poutine.broadcast (a no-op since Pyro 0.4) dropped",
)
def _():
    N = 100
    with seeded(11):
        y = dist.Bernoulli(torch.tensor(0.3)).sample(torch.Size((N,)))
        z = dist.Bernoulli(0.65 * y + 0.1).sample()
        data = dist.Normal(2.0 * z, 1.0).sample()

    def model(data):
        y_prob = pyro.sample("y_prob", dist.Beta(1.0, 1.0))
        with pyro.plate("data", data.shape[0]):
            y = pyro.sample("y", dist.Bernoulli(y_prob))
            z = pyro.sample("z", dist.Bernoulli(0.65 * y + 0.1))
            pyro.sample("obs", dist.Normal(2.0 * z, 1.0), obs=data)

    return model, (data,), {}


@program(
    "nuts_gaussian_hmm",
    NUTS + "test_gaussian_hmm[3]",
    "discrete+enumerate",
    warns={"enumerate": "x_0"},
    notes="num_steps=3 (4 observations); `transition[x]` indexes the leading dim",
)
def _():
    dim, num_steps = 4, 3
    with seeded(12):
        transition_probs = torch.rand(dim, dim)
        emissions_loc = torch.arange(dim, dtype=torch.get_default_dtype())
        state = torch.tensor(1)
        obs = [dist.Normal(emissions_loc[state], 1.0).sample()]
        for _ in range(num_steps):
            state = dist.Categorical(transition_probs[state]).sample()
            obs.append(dist.Normal(emissions_loc[state], 1.0).sample())
        data = torch.stack(obs)

    def model(data):
        initialize = pyro.sample("initialize", dist.Dirichlet(torch.ones(dim)))
        with pyro.plate("states", dim):
            transition = pyro.sample("transition", dist.Dirichlet(torch.ones(dim, dim)))
            emission_loc = pyro.sample("emission_loc", dist.Normal(torch.zeros(dim), torch.ones(dim)))
            emission_scale = pyro.sample("emission_scale", dist.LogNormal(torch.zeros(dim), torch.ones(dim)))
        x = None
        for t, y in pyro.markov(enumerate(data)):
            x = pyro.sample(
                f"x_{t}",
                dist.Categorical(initialize if x is None else transition[x]),
                infer={"enumerate": "parallel"},
            )
            pyro.sample(f"y_{t}", dist.Normal(emission_loc[x], emission_scale[x]), obs=y)

    return model, (data,), {}


@program(
    "nuts_beta_binomial",
    NUTS + "test_beta_binomial[True]",
    "continuous",
    notes="hyperpriors=True; BetaBinomialPair written out as Beta latent + Binomial likelihood "
    "(the source collapses it with collapse_conjugate for NUTS)",
    slow=True,
)
def _():
    true_probs = torch.tensor([[0.7, 0.4], [0.6, 0.4]])
    total_count = torch.tensor([[1000.0, 600.0], [400.0, 800.0]])
    with seeded(13):
        data = dist.Binomial(total_count=total_count, probs=true_probs).sample(torch.Size((10,)))

    def model(data):
        with pyro.plate("plate_0", data.shape[-1]):
            alpha = pyro.sample("alpha", dist.HalfCauchy(1.0))
            beta = pyro.sample("beta", dist.HalfCauchy(1.0))
            with pyro.plate("plate_1", data.shape[-2]):
                probs = pyro.sample("probs", dist.Beta(alpha, beta))
                with pyro.plate("data", data.shape[0]):
                    pyro.sample("binomial", dist.Binomial(probs=probs, total_count=total_count), obs=data)

    return model, (data,), {}


@program(
    "nuts_gamma_poisson",
    NUTS + "test_gamma_poisson[True]",
    "continuous",
    notes="hyperpriors=True; GammaPoissonPair written out as Gamma latent + Poisson likelihood",
)
def _():
    with seeded(14):
        data = dist.Poisson(rate=torch.tensor([3.0, 10.0])).sample(torch.Size((100,)))

    def model(data):
        with pyro.plate("latent_dim", data.shape[1]):
            alpha = pyro.sample("alpha", dist.HalfCauchy(1.0))
            beta = pyro.sample("beta", dist.HalfCauchy(1.0))
            rate = pyro.sample("rate", dist.Gamma(alpha, beta))
            with pyro.plate("data", data.shape[0]):
                pyro.sample("obs", dist.Poisson(rate), obs=data)

    return model, (data,), {}


@program(
    "nuts_structured_mass",
    NUTS + "test_structured_mass",
    "continuous",
    notes="the observed value is a function of the latents (obs=cat(w, x, y, z))",
)
def _():
    with seeded(15):
        A = torch.randn(5, 5)
    cov = A @ A.T / 5 + 0.5 * torch.eye(5)

    def model(cov):
        w = pyro.sample("w", dist.Normal(0, 1000).expand([2]).to_event(1))
        x = pyro.sample("x", dist.Normal(0, 1000).expand([1]).to_event(1))
        y = pyro.sample("y", dist.Normal(0, 1000).expand([1]).to_event(1))
        z = pyro.sample("z", dist.Normal(0, 1000).expand([1]).to_event(1))
        wxyz = torch.cat([w, x, y, z])
        pyro.sample("obs", dist.MultivariateNormal(torch.zeros(5), cov), obs=wxyz)

    return model, (cov,), {}


@program("nuts_arrowhead_mass", NUTS + "test_arrowhead_mass", "continuous", slow=True)
def _():
    with seeded(16):
        A = torch.randn(6, 6)
    prec = A @ A.T / 6 + 0.5 * torch.eye(6)

    def model(prec):
        w = pyro.sample("w", dist.Normal(0, 1000).expand([2]).to_event(1))
        x = pyro.sample("x", dist.Normal(0, 1000).expand([1]).to_event(1))
        y = pyro.sample("y", dist.Normal(0, 1000).expand([1]).to_event(1))
        z = pyro.sample("z", dist.Normal(0, 1000).expand([2]).to_event(1))
        wyxz = torch.cat([w, y, x, z])
        pyro.sample("obs", dist.MultivariateNormal(torch.zeros(6), precision_matrix=prec), obs=wyxz)

    return model, (prec,), {}


# =====================================================================================
# examples/
# =====================================================================================

EIGHT_SCHOOLS_Y = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]  # examples/eight_schools/data.py
EIGHT_SCHOOLS_SIGMA = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]


@program(
    "eight_schools_mcmc",
    "pyro examples/eight_schools/mcmc.py::conditioned_model",
    "continuous",
    notes="model(sigma) conditioned on obs=y through poutine.condition, as in the source",
)
def _():
    J = 8
    y = torch.tensor(EIGHT_SCHOOLS_Y)
    sigma = torch.tensor(EIGHT_SCHOOLS_SIGMA)

    def model(sigma):
        eta = pyro.sample("eta", dist.Normal(torch.zeros(J), torch.ones(J)))
        mu = pyro.sample("mu", dist.Normal(torch.zeros(1), 10 * torch.ones(1)))
        tau = pyro.sample("tau", dist.HalfCauchy(scale=25 * torch.ones(1)))
        theta = mu + tau * eta
        return pyro.sample("obs", dist.Normal(theta, sigma))

    def conditioned_model(model, sigma, y):
        return poutine.condition(model, data={"obs": y})(sigma)

    return conditioned_model, (model, sigma, y), {}


@program("eight_schools_svi", "pyro examples/eight_schools/svi.py::model", "continuous", slow=True)
def _():
    J = 8
    data = torch.stack([torch.tensor(EIGHT_SCHOOLS_Y), torch.tensor(EIGHT_SCHOOLS_SIGMA)], dim=1)

    def model(data):
        y = data[:, 0]
        sigma = data[:, 1]
        with pyro.plate("data", J):
            eta = pyro.sample("eta", dist.Normal(torch.zeros(J), torch.ones(J)))
            mu = pyro.sample("mu", dist.Normal(torch.zeros(1), 10 * torch.ones(1)))
            tau = pyro.sample("tau", dist.HalfCauchy(scale=25 * torch.ones(1)))
            theta = mu + tau * eta
            pyro.sample("obs", dist.Normal(theta, sigma), obs=y)

    return model, (data,), {}


class SparseGammaDEF:
    """``SparseGammaDEF.model`` of examples/sparse_gamma_def.py with small layers."""

    def __init__(self, top_width=4, mid_width=3, bottom_width=2, image_size=6):
        self.top_width = top_width
        self.mid_width = mid_width
        self.bottom_width = bottom_width
        self.image_size = image_size
        self.alpha_z = torch.tensor(0.1)
        self.beta_z = torch.tensor(0.1)
        self.alpha_w = torch.tensor(0.1)
        self.beta_w = torch.tensor(0.3)

    def model(self, x):
        x_size = x.size(0)
        with pyro.plate("w_top_plate", self.top_width * self.mid_width):
            w_top = pyro.sample("w_top", dist.Gamma(self.alpha_w, self.beta_w))
        with pyro.plate("w_mid_plate", self.mid_width * self.bottom_width):
            w_mid = pyro.sample("w_mid", dist.Gamma(self.alpha_w, self.beta_w))
        with pyro.plate("w_bottom_plate", self.bottom_width * self.image_size):
            w_bottom = pyro.sample("w_bottom", dist.Gamma(self.alpha_w, self.beta_w))
        with pyro.plate("data", x_size):
            z_top = pyro.sample(
                "z_top", dist.Gamma(self.alpha_z, self.beta_z).expand([self.top_width]).to_event(1)
            )
            w_top = (
                w_top.reshape(self.top_width, self.mid_width)
                if w_top.dim() == 1
                else w_top.reshape(-1, self.top_width, self.mid_width)
            )
            mean_mid = torch.matmul(z_top, w_top)
            z_mid = pyro.sample("z_mid", dist.Gamma(self.alpha_z, self.beta_z / mean_mid).to_event(1))
            w_mid = (
                w_mid.reshape(self.mid_width, self.bottom_width)
                if w_mid.dim() == 1
                else w_mid.reshape(-1, self.mid_width, self.bottom_width)
            )
            mean_bottom = torch.matmul(z_mid, w_mid)
            z_bottom = pyro.sample(
                "z_bottom", dist.Gamma(self.alpha_z, self.beta_z / mean_bottom).to_event(1)
            )
            w_bottom = (
                w_bottom.reshape(self.bottom_width, self.image_size)
                if w_bottom.dim() == 1
                else w_bottom.reshape(-1, self.bottom_width, self.image_size)
            )
            mean_obs = torch.matmul(z_bottom, w_bottom)
            pyro.sample("obs", dist.Poisson(mean_obs).to_event(1), obs=x)


@program(
    "sparse_gamma_def",
    "pyro examples/sparse_gamma_def.py::SparseGammaDEF.model",
    "continuous",
    slow=True,
    notes="layers 4-3-2 and 8 synthetic 6-pixel count images instead of Olivetti faces (100-40-15, 4096 px)",
)
def _():
    sgdef = SparseGammaDEF()
    with seeded(17):
        x = dist.Poisson(3.0 * torch.ones(8, sgdef.image_size)).sample()
    return sgdef.model, (x,), {}


# Efron & Morris (1975) batting data, the table examples/baseball.py downloads (EfronMorrisBB.txt):
# hits in each of 18 players' first 45 at-bats.
BASEBALL_HITS = [
    18.0,
    17.0,
    16.0,
    15.0,
    14.0,
    14.0,
    13.0,
    12.0,
    11.0,
    11.0,
    10.0,
    10.0,
    10.0,
    10.0,
    10.0,
    9.0,
]
BASEBALL_HITS += [8.0, 7.0]


def _baseball_data():
    hits = torch.tensor(BASEBALL_HITS)
    return torch.full_like(hits, 45.0), hits


def _scalar_like(t, v):
    from pyro.distributions.util import scalar_like

    return scalar_like(t, v)


@program("baseball_fully_pooled", "pyro examples/baseball.py::fully_pooled", "continuous")
def _():
    def fully_pooled(at_bats, hits):
        phi_prior = dist.Uniform(_scalar_like(at_bats, 0), _scalar_like(at_bats, 1))
        phi = pyro.sample("phi", phi_prior)
        num_players = at_bats.shape[0]
        with pyro.plate("num_players", num_players):
            return pyro.sample("obs", dist.Binomial(at_bats, phi), obs=hits)

    return fully_pooled, _baseball_data(), {}


@program("baseball_not_pooled", "pyro examples/baseball.py::not_pooled", "continuous")
def _():
    def not_pooled(at_bats, hits):
        num_players = at_bats.shape[0]
        with pyro.plate("num_players", num_players):
            phi_prior = dist.Uniform(_scalar_like(at_bats, 0), _scalar_like(at_bats, 1))
            phi = pyro.sample("phi", phi_prior)
            return pyro.sample("obs", dist.Binomial(at_bats, phi), obs=hits)

    return not_pooled, _baseball_data(), {}


@program("baseball_partially_pooled", "pyro examples/baseball.py::partially_pooled", "continuous", slow=True)
def _():
    def partially_pooled(at_bats, hits):
        num_players = at_bats.shape[0]
        m = pyro.sample("m", dist.Uniform(_scalar_like(at_bats, 0), _scalar_like(at_bats, 1)))
        kappa = pyro.sample("kappa", dist.Pareto(_scalar_like(at_bats, 1), _scalar_like(at_bats, 1.5)))
        with pyro.plate("num_players", num_players):
            phi_prior = dist.Beta(m * kappa, (1 - m) * kappa)
            phi = pyro.sample("phi", phi_prior)
            return pyro.sample("obs", dist.Binomial(at_bats, phi), obs=hits)

    return partially_pooled, _baseball_data(), {}


@program(
    "baseball_partially_pooled_with_logit",
    "pyro examples/baseball.py::partially_pooled_with_logit",
    "continuous",
)
def _():
    def partially_pooled_with_logit(at_bats, hits):
        num_players = at_bats.shape[0]
        loc = pyro.sample("loc", dist.Normal(_scalar_like(at_bats, -1), _scalar_like(at_bats, 1)))
        scale = pyro.sample("scale", dist.HalfCauchy(scale=_scalar_like(at_bats, 1)))
        with pyro.plate("num_players", num_players):
            alpha = pyro.sample("alpha", dist.Normal(loc, scale))
            return pyro.sample("obs", dist.Binomial(at_bats, logits=alpha), obs=hits)

    return partially_pooled_with_logit, _baseball_data(), {}


class SviTorchModel(pyro.nn.PyroModule):
    """``Model`` of examples/svi_torch.py: Bayesian linear regression as a PyroModule."""

    def __init__(self, size):
        super().__init__()
        self.size = size
        self.register_buffer("zero", torch.tensor(0.0))

    def forward(self, covariates, data=None):
        coeff = pyro.sample("coeff", dist.Normal(self.zero, 1))
        bias = pyro.sample("bias", dist.Normal(self.zero, 1))
        scale = pyro.sample("scale", dist.LogNormal(self.zero, 1))
        with pyro.plate("data", self.size, len(covariates)):
            loc = bias + coeff * covariates
            return pyro.sample("obs", dist.Normal(loc, scale), obs=data)


def _svi_torch_data(n):
    with seeded(18), torch.no_grad():
        covariates = torch.randn(n)
        data = SviTorchModel(n)(covariates)
    return covariates, data


@program(
    "svi_torch",
    "pyro examples/svi_torch.py::Model",
    "continuous",
    notes="500 synthetic points drawn from the model (the source's recipe), the full data set at once",
)
def _():
    covariates, data = _svi_torch_data(500)
    return SviTorchModel(500), (covariates, data), {}


@program(
    "svi_torch_minibatch",
    "pyro examples/svi_torch.py::Model",
    "continuous",
    subsample=True,
    notes="one minibatch of 100 of size=1000, as the source's DataLoader passes it: likelihood scaled by 10",
)
def _():
    covariates, data = _svi_torch_data(1000)
    return SviTorchModel(1000), (covariates[:100], data[:100]), {}


def _hmm_data(num_sequences=3, max_length=5, data_dim=3, seed=19):
    with seeded(seed):
        sequences = (torch.rand(num_sequences, max_length, data_dim) < 0.3).to(torch.get_default_dtype())
        lengths = torch.randint(2, max_length + 1, (num_sequences,))
        lengths[0] = max_length
    return sequences, lengths


@program(
    "hmm_model_0",
    "pyro examples/hmm.py::model_0",
    "discrete+enumerate",
    warns={"enumerate": "x_0_0"},
    notes="hidden_dim=2, 3 synthetic binary sequences of up to 5 steps over 3 tones "
    "(JSB chorales in the source)",
)
def _():
    sequences, lengths = _hmm_data()
    args = argparse.Namespace(hidden_dim=2, jit=False)

    def model_0(sequences, lengths, args, batch_size=None, include_prior=True):
        num_sequences, max_length, data_dim = sequences.shape
        with poutine.mask(mask=include_prior):
            probs_x = pyro.sample(
                "probs_x", dist.Dirichlet(0.9 * torch.eye(args.hidden_dim) + 0.1).to_event(1)
            )
            probs_y = pyro.sample(
                "probs_y", dist.Beta(0.1, 0.9).expand([args.hidden_dim, data_dim]).to_event(2)
            )
        tones_plate = pyro.plate("tones", data_dim, dim=-1)
        for i in pyro.plate("sequences", len(sequences), batch_size):
            length = lengths[i]
            sequence = sequences[i, :length]
            x = 0
            for t in pyro.markov(range(length)):
                x = pyro.sample(f"x_{i}_{t}", dist.Categorical(probs_x[x]), infer={"enumerate": "parallel"})
                with tones_plate:
                    pyro.sample(f"y_{i}_{t}", dist.Bernoulli(probs_y[x.squeeze(-1)]), obs=sequence[t])

    return model_0, (sequences, lengths), {"args": args, "batch_size": None}


@program(
    "hmm_model_1",
    "pyro examples/hmm.py::model_1",
    "discrete+enumerate",
    warns={"enumerate": "x_0"},
    notes="hidden_dim=2, synthetic sequences as hmm_model_0",
)
def _():
    sequences, lengths = _hmm_data()
    args = argparse.Namespace(hidden_dim=2, jit=False)

    def model_1(sequences, lengths, args, batch_size=None, include_prior=True):
        num_sequences, max_length, data_dim = map(int, sequences.shape)
        with poutine.mask(mask=include_prior):
            probs_x = pyro.sample(
                "probs_x", dist.Dirichlet(0.9 * torch.eye(args.hidden_dim) + 0.1).to_event(1)
            )
            probs_y = pyro.sample(
                "probs_y", dist.Beta(0.1, 0.9).expand([args.hidden_dim, data_dim]).to_event(2)
            )
        tones_plate = pyro.plate("tones", data_dim, dim=-1)
        with pyro.plate("sequences", num_sequences, batch_size, dim=-2) as batch:
            lengths = lengths[batch]
            x = 0
            for t in pyro.markov(range(max_length if args.jit else lengths.max())):
                with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                    x = pyro.sample(f"x_{t}", dist.Categorical(probs_x[x]), infer={"enumerate": "parallel"})
                    with tones_plate:
                        pyro.sample(f"y_{t}", dist.Bernoulli(probs_y[x.squeeze(-1)]), obs=sequences[batch, t])

    return model_1, (sequences, lengths), {"args": args, "batch_size": None}


@program(
    "hmm_model_2",
    "pyro examples/hmm.py::model_2",
    "discrete+enumerate",
    warns={"enumerate": "x_0"},
    notes="hidden_dim=2, synthetic sequences as hmm_model_0",
)
def _():
    sequences, lengths = _hmm_data()
    args = argparse.Namespace(hidden_dim=2, jit=False)

    def model_2(sequences, lengths, args, batch_size=None, include_prior=True):
        num_sequences, max_length, data_dim = map(int, sequences.shape)
        with poutine.mask(mask=include_prior):
            probs_x = pyro.sample(
                "probs_x", dist.Dirichlet(0.9 * torch.eye(args.hidden_dim) + 0.1).to_event(1)
            )
            probs_y = pyro.sample(
                "probs_y", dist.Beta(0.1, 0.9).expand([args.hidden_dim, 2, data_dim]).to_event(3)
            )
        tones_plate = pyro.plate("tones", data_dim, dim=-1)
        with pyro.plate("sequences", num_sequences, batch_size, dim=-2) as batch:
            lengths = lengths[batch]
            x, y = 0, 0
            for t in pyro.markov(range(max_length if args.jit else lengths.max())):
                with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                    x = pyro.sample(f"x_{t}", dist.Categorical(probs_x[x]), infer={"enumerate": "parallel"})
                    with tones_plate as tones:
                        y = pyro.sample(
                            f"y_{t}", dist.Bernoulli(probs_y[x, y, tones]), obs=sequences[batch, t]
                        ).long()

    return model_2, (sequences, lengths), {"args": args, "batch_size": None}


@program(
    "lda",
    "pyro examples/lda.py::model",
    "discrete+enumerate",
    warns={"enumerate": "word_topics"},
    notes="3 topics, 6 words, 4 documents of 5 words, generated by the model itself (as the source does)",
)
def _():
    args = argparse.Namespace(num_topics=3, num_words=6, num_docs=4, num_words_per_doc=5)

    def model(data=None, args=None, batch_size=None):
        with pyro.plate("topics", args.num_topics):
            topic_weights = pyro.sample("topic_weights", dist.Gamma(1.0 / args.num_topics, 1.0))
            topic_words = pyro.sample(
                "topic_words", dist.Dirichlet(torch.ones(args.num_words) / args.num_words)
            )
        with pyro.plate("documents", args.num_docs) as ind:
            if data is not None:
                assert data.shape == (args.num_words_per_doc, args.num_docs)
                data = data[:, ind]
            doc_topics = pyro.sample("doc_topics", dist.Dirichlet(topic_weights))
            with pyro.plate("words", args.num_words_per_doc):
                word_topics = pyro.sample(
                    "word_topics", dist.Categorical(doc_topics), infer={"enumerate": "parallel"}
                )
                data = pyro.sample("doc_words", dist.Categorical(topic_words[word_topics]), obs=data)
        return topic_weights, topic_words, data

    with seeded(20):
        _, _, data = model(args=args)
    return model, (), {"data": data, "args": args}


@program(
    "toy_mixture",
    "pyro examples/toy_mixture_model_discrete_enumeration.py::model",
    "discrete+enumerate",
    warns={"enumerate": "'B'"},
    notes="100 observations from the source's generate_data; `p_A.expand(num_obs)` is not vectorizable",
)
def _():
    num_obs = 100
    with seeded(21):
        prior = {
            "A": torch.tensor([1.0, 10.0]),
            "B": torch.tensor([[10.0, 1.0], [1.0, 10.0]]),
            "C": torch.tensor([[10.0, 1.0], [1.0, 10.0]]),
        }
        CPDs = {
            "p_A": dist.Beta(prior["A"][0], prior["A"][1]).sample(),
            "p_B": dist.Beta(prior["B"][:, 0], prior["B"][:, 1]).sample(),
            "p_C": dist.Beta(prior["C"][:, 0], prior["C"][:, 1]).sample(),
        }
        data = {"A": dist.Bernoulli(torch.ones(num_obs) * CPDs["p_A"]).sample()}
        data["B"] = dist.Bernoulli(torch.gather(CPDs["p_B"], 0, data["A"].type(torch.long))).sample()
        data["C"] = dist.Bernoulli(torch.gather(CPDs["p_C"], 0, data["B"].type(torch.long))).sample()

    @config_enumerate
    def model(prior, obs, num_obs):
        p_A = pyro.sample("p_A", dist.Beta(1, 1))
        p_B = pyro.sample("p_B", dist.Beta(torch.ones(2), torch.ones(2)).to_event(1))
        p_C = pyro.sample("p_C", dist.Beta(torch.ones(2), torch.ones(2)).to_event(1))
        with pyro.plate("data_plate", num_obs):
            A = pyro.sample("A", dist.Bernoulli(p_A.expand(num_obs)), obs=obs["A"])
            B = pyro.sample(
                "B", dist.Bernoulli(Vindex(p_B)[A.type(torch.long)]), infer={"enumerate": "parallel"}
            )
            pyro.sample("C", dist.Bernoulli(Vindex(p_C)[B.type(torch.long)]), obs=obs["C"])

    return model, (prior, data, num_obs), {}


def _dipper(with_sex=False):
    """The dipper capture histories of examples/capture_recapture/ (copied to tests/pyro_programs/data/)."""
    dtype = torch.get_default_dtype()
    with open(os.path.join(DATA_DIR, "dipper_capture_history.csv")) as f:
        rows = [[float(v) for v in row[1:]] for row in csv.reader(f) if row]
    capture_history = torch.tensor(rows, dtype=dtype)
    sex = None
    if with_sex:
        with open(os.path.join(DATA_DIR, "dipper_sex.csv")) as f:
            sex = torch.tensor([float(row[1]) for row in csv.reader(f) if row], dtype=dtype)
    return capture_history, sex


CJS = "pyro examples/capture_recapture/cjs.py::"
CJS_NOTE = "the source's dipper data (294 birds x 7 occasions; tests/pyro_programs/data/)"


@program(
    "cjs_model_1",
    CJS + "model_1",
    "discrete+enumerate",
    warns={"enumerate": "z_0"},
    slow=True,
    notes=CJS_NOTE,
)
def _():
    def model_1(capture_history, sex):
        N, T = capture_history.shape
        phi = pyro.sample("phi", dist.Uniform(0.0, 1.0))
        rho = pyro.sample("rho", dist.Uniform(0.0, 1.0))
        with pyro.plate("animals", N, dim=-1):
            z = torch.ones(N)
            first_capture_mask = torch.zeros(N).bool()
            for t in pyro.markov(range(T)):
                with poutine.mask(mask=first_capture_mask):
                    mu_z_t = first_capture_mask.float() * phi * z + (1 - first_capture_mask.float())
                    z = pyro.sample(f"z_{t}", dist.Bernoulli(mu_z_t), infer={"enumerate": "parallel"})
                    mu_y_t = rho * z
                    pyro.sample(f"y_{t}", dist.Bernoulli(mu_y_t), obs=capture_history[:, t])
                first_capture_mask |= capture_history[:, t].bool()

    return model_1, _dipper(), {}


@program(
    "cjs_model_2",
    CJS + "model_2",
    "discrete+enumerate",
    warns={"enumerate": "z_0"},
    slow=True,
    notes=CJS_NOTE,
)
def _():
    def model_2(capture_history, sex):
        N, T = capture_history.shape
        rho = pyro.sample("rho", dist.Uniform(0.0, 1.0))
        z = torch.ones(N)
        first_capture_mask = torch.zeros(N).bool()
        animals_plate = pyro.plate("animals", N, dim=-1)
        for t in pyro.markov(range(T)):
            phi_t = pyro.sample(f"phi_{t}", dist.Uniform(0.0, 1.0)) if t > 0 else 1.0
            with animals_plate, poutine.mask(mask=first_capture_mask):
                mu_z_t = first_capture_mask.float() * phi_t * z + (1 - first_capture_mask.float())
                z = pyro.sample(f"z_{t}", dist.Bernoulli(mu_z_t), infer={"enumerate": "parallel"})
                mu_y_t = rho * z
                pyro.sample(f"y_{t}", dist.Bernoulli(mu_y_t), obs=capture_history[:, t])
            first_capture_mask |= capture_history[:, t].bool()

    return model_2, _dipper(), {}


@program(
    "cjs_model_3",
    CJS + "model_3",
    "discrete+enumerate",
    warns={"enumerate": "z_0"},
    slow=True,
    notes=CJS_NOTE,
)
def _():
    def model_3(capture_history, sex):
        def logit(p):
            return torch.log(p) - torch.log1p(-p)

        N, T = capture_history.shape
        phi_mean = pyro.sample("phi_mean", dist.Uniform(0.0, 1.0))
        phi_logit_mean = logit(phi_mean)
        phi_sigma = pyro.sample("phi_sigma", dist.Uniform(0.0, 10.0))
        rho = pyro.sample("rho", dist.Uniform(0.0, 1.0))
        z = torch.ones(N)
        first_capture_mask = torch.zeros(N).bool()
        animals_plate = pyro.plate("animals", N, dim=-1)
        for t in pyro.markov(range(T)):
            phi_logit_t = (
                pyro.sample(f"phi_logit_{t}", dist.Normal(phi_logit_mean, phi_sigma))
                if t > 0
                else torch.tensor(0.0)
            )
            phi_t = torch.sigmoid(phi_logit_t)
            with animals_plate, poutine.mask(mask=first_capture_mask):
                mu_z_t = first_capture_mask.float() * phi_t * z + (1 - first_capture_mask.float())
                z = pyro.sample(f"z_{t}", dist.Bernoulli(mu_z_t), infer={"enumerate": "parallel"})
                mu_y_t = rho * z
                pyro.sample(f"y_{t}", dist.Bernoulli(mu_y_t), obs=capture_history[:, t])
            first_capture_mask |= capture_history[:, t].bool()

    return model_3, _dipper(), {}


@program(
    "cjs_model_4",
    CJS + "model_4",
    "discrete+enumerate",
    warns={"enumerate": "z_0"},
    slow=True,
    notes=CJS_NOTE + " and sexes",
)
def _():
    def model_4(capture_history, sex):
        N, T = capture_history.shape
        phi_male = pyro.sample("phi_male", dist.Uniform(0.0, 1.0))
        phi_female = pyro.sample("phi_female", dist.Uniform(0.0, 1.0))
        phi = sex * phi_male + (1.0 - sex) * phi_female
        rho = pyro.sample("rho", dist.Uniform(0.0, 1.0))
        with pyro.plate("animals", N, dim=-1):
            z = torch.ones(N)
            first_capture_mask = torch.zeros(N).bool()
            for t in pyro.markov(range(T)):
                with poutine.mask(mask=first_capture_mask):
                    mu_z_t = first_capture_mask.float() * phi * z + (1 - first_capture_mask.float())
                    z = pyro.sample(f"z_{t}", dist.Bernoulli(mu_z_t), infer={"enumerate": "parallel"})
                    mu_y_t = rho * z
                    pyro.sample(f"y_{t}", dist.Bernoulli(mu_y_t), obs=capture_history[:, t])
                first_capture_mask |= capture_history[:, t].bool()

    return model_4, _dipper(with_sex=True), {}


@program(
    "cjs_model_5",
    CJS + "model_5",
    "discrete+enumerate",
    warns={"enumerate": "z_0"},
    slow=True,
    notes=CJS_NOTE + " and sexes",
)
def _():
    def model_5(capture_history, sex):
        N, T = capture_history.shape
        phi_beta = pyro.sample("phi_beta", dist.Normal(0.0, 10.0))
        phi_beta = sex * phi_beta
        rho = pyro.sample("rho", dist.Uniform(0.0, 1.0))
        z = torch.ones(N)
        first_capture_mask = torch.zeros(N).bool()
        animals_plate = pyro.plate("animals", N, dim=-1)
        for t in pyro.markov(range(T)):
            phi_gamma_t = pyro.sample(f"phi_gamma_{t}", dist.Normal(0.0, 10.0)) if t > 0 else 0.0
            phi_t = torch.sigmoid(phi_beta + phi_gamma_t)
            with animals_plate, poutine.mask(mask=first_capture_mask):
                mu_z_t = first_capture_mask.float() * phi_t * z + (1 - first_capture_mask.float())
                z = pyro.sample(f"z_{t}", dist.Bernoulli(mu_z_t), infer={"enumerate": "parallel"})
                mu_y_t = rho * z
                pyro.sample(f"y_{t}", dist.Bernoulli(mu_y_t), obs=capture_history[:, t])
            first_capture_mask |= capture_history[:, t].bool()

    return model_5, _dipper(with_sex=True), {}


@program(
    "lkj",
    "pyro examples/lkj.py::model",
    "continuous",
    notes="d=3, 50 standard-normal rows (the source: d=5, n=500); `torch.mm(torch.diag(theta.sqrt()), ...)`",
)
def _():
    with seeded(22):
        y = torch.randn(50, 3)

    def model(y):
        d = y.shape[1]
        N = y.shape[0]
        options = dict(dtype=y.dtype, device=y.device)
        theta = pyro.sample("theta", dist.HalfCauchy(torch.ones(d, **options)))
        concentration = torch.ones((), **options)
        L_omega = pyro.sample("L_omega", dist.LKJCholesky(d, concentration))
        L_Omega = torch.mm(torch.diag(theta.sqrt()), L_omega)
        mu = torch.zeros(d, **options)
        with pyro.plate("observations", N):
            obs = pyro.sample("obs", dist.MultivariateNormal(mu, scale_tril=L_Omega), obs=y)
        return obs

    return model, (y,), {}


class _Decoder(nn.Module):
    def __init__(self, z_dim, hidden_dim, pixels):
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, pixels)
        self.softplus = nn.Softplus()

    def forward(self, z):
        hidden = self.softplus(self.fc1(z))
        return torch.sigmoid(self.fc21(hidden))


class VAE(nn.Module):
    """``VAE.model`` of examples/vae/vae.py: the decoder is a model-side ``pyro.module``."""

    def __init__(self, z_dim=2, hidden_dim=8, pixels=16):
        super().__init__()
        self.decoder = _Decoder(z_dim, hidden_dim, pixels)
        self.z_dim = z_dim
        self.pixels = pixels

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = torch.zeros(x.shape[0], self.z_dim, dtype=x.dtype, device=x.device)
            z_scale = torch.ones(x.shape[0], self.z_dim, dtype=x.dtype, device=x.device)
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder.forward(z)
            pyro.sample(
                "obs",
                dist.Bernoulli(loc_img, validate_args=False).to_event(1),
                obs=x.reshape(-1, self.pixels),
            )
            return loc_img


@program(
    "vae",
    "pyro examples/vae/vae.py::VAE.model",
    "continuous+params",
    warns={"params": "decoder"},
    notes="z_dim=2, 8 hidden units, 10 synthetic 16-pixel binary images (MNIST, 784 px, in the source)",
)
def _():
    with seeded(23):
        vae = VAE()
        x = (torch.rand(10, vae.pixels) < 0.4).to(torch.get_default_dtype())
    return vae.model, (x,), {}


# =====================================================================================
# tutorial/source/
# =====================================================================================


class BayesianRegression(pyro.nn.PyroModule):
    """``BayesianRegression`` of tutorial/source/bayesian_regression.ipynb (PyroSample weights)."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.linear = pyro.nn.PyroModule[nn.Linear](in_features, out_features)
        self.linear.weight = pyro.nn.PyroSample(
            dist.Normal(0.0, 1.0).expand([out_features, in_features]).to_event(2)
        )
        self.linear.bias = pyro.nn.PyroSample(dist.Normal(0.0, 10.0).expand([out_features]).to_event(1))

    def forward(self, x, y=None):
        sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, sigma), obs=y)
        return mean


@program(
    "bayesian_regression_pyromodule",
    "pyro tutorial/source/bayesian_regression.ipynb::BayesianRegression",
    "continuous",
    notes="100 synthetic rows shaped like the rugged data (cont_africa, rugged, their product)",
)
def _():
    with seeded(24):
        africa = (torch.rand(100) < 0.3).to(torch.get_default_dtype())
        rugged = torch.rand(100) * 5
        x = torch.stack([africa, rugged, africa * rugged], -1)
        y = 9.0 - 1.5 * africa - 0.2 * rugged + 0.4 * africa * rugged + 0.9 * torch.randn(100)
    with seeded(25):
        module = BayesianRegression(3, 1)
    return module, (x, y), {}


@program(
    "gmm_tutorial",
    "pyro tutorial/source/gmm.ipynb::model",
    "discrete+enumerate",
    warns={"enumerate": "assignment"},
    notes="the tutorial's 5 data points; `locs[assignment]` indexes the leading dim",
)
def _():
    K = 2
    data = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0])

    @config_enumerate
    def model(data):
        weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(K)))
        scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
        with pyro.plate("components", K):
            locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(data)):
            assignment = pyro.sample("assignment", dist.Categorical(weights))
            pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)

    return model, (data,), {}


@program(
    "coin", "pyro tutorial/source/svi_part_i.ipynb::model", "continuous", notes="6 heads, 4 tails", slow=True
)
def _():
    data = [torch.tensor(1.0)] * 6 + [torch.tensor(0.0)] * 4

    def model(data):
        alpha0 = torch.tensor(10.0)
        beta0 = torch.tensor(10.0)
        f = pyro.sample("latent_fairness", dist.Beta(alpha0, beta0))
        for i in range(len(data)):
            pyro.sample(f"obs_{i}", dist.Bernoulli(f), obs=data[i])

    return model, (data,), {}


@program(
    "deterministic",
    "pyro tests/infer/test_predictive.py::test_deterministic[True-event_shape1]",
    "continuous",
    notes="with_plate=True, event_shape=(2,): `.to_event()` with no argument makes every batch dim "
    "an event dim",
)
def _():
    def model(y=None):
        with pyro.plate("plate", 3):
            x = pyro.sample("x", dist.Normal(0, 1).expand((2,)).to_event())
            x2 = pyro.deterministic("x2", x**2, event_dim=1)
        pyro.deterministic("x3", x2)
        return pyro.sample("obs", dist.Normal(x2, 0.1).to_event(), obs=y)

    return model, (torch.tensor(4.0),), {}


INTRO = "pyro tutorial/source/intro_part_i.ipynb::"


def _weather():
    cloudy = pyro.sample("cloudy", dist.Bernoulli(0.3))
    cloudy = "cloudy" if cloudy.item() == 1.0 else "sunny"
    mean_temp = {"cloudy": 55.0, "sunny": 75.0}[cloudy]
    scale_temp = {"cloudy": 10.0, "sunny": 15.0}[cloudy]
    temp = pyro.sample("temp", dist.Normal(mean_temp, scale_temp))
    return cloudy, temp.item()


@program("weather", INTRO + "weather", "discrete", notes="`cloudy.item()`: not vectorizable")
def _():
    return _weather, (), {}


@program("ice_cream_sales", INTRO + "ice_cream_sales", "discrete", notes="`temp.item()`: not vectorizable")
def _():
    def ice_cream_sales():
        cloudy, temp = _weather()
        expected_sales = 200.0 if cloudy == "sunny" and temp > 80.0 else 50.0
        return pyro.sample("ice_cream", dist.Normal(expected_sales, 10.0))

    return ice_cream_sales, (), {}


@program(
    "geometric",
    INTRO + "geometric",
    "discrete+unsupported",
    error=vipkg.ModelError,
    match=r"x_\d|fixed set of sites",
    notes="recursion until a Bernoulli draw is 1: the number of sites is random",
)
def _():
    def geometric(p, t=None):
        if t is None:
            t = 0
        x = pyro.sample(f"x_{t}", dist.Bernoulli(p))
        if x.item() == 1:
            return 0
        else:
            return 1 + geometric(p, t + 1)

    return geometric, (0.5,), {}


@program("normal_product", INTRO + "make_normal_normal", "continuous", notes="make_normal_normal()(1.0)")
def _():
    def normal_product(loc, scale):
        z1 = pyro.sample("z1", dist.Normal(loc, scale))
        z2 = pyro.sample("z2", dist.Normal(loc, scale))
        return z1 * z2

    def make_normal_normal():
        mu_latent = pyro.sample("mu_latent", dist.Normal(0, 1))
        return lambda scale: normal_product(mu_latent, scale)

    def model():
        return make_normal_normal()(1.0)

    return model, (), {}


_names = [p.name for p in PROGRAMS]
assert len(_names) == len(set(_names)), "program names must be unique"
BY_NAME = {p.name: p for p in PROGRAMS}


# =====================================================================================
# shared helpers
# =====================================================================================


def _is_sample(site) -> bool:
    from pyro.poutine.subsample_messenger import _Subsample

    return site["type"] == "sample" and not isinstance(site["fn"], _Subsample)


def build(prog: Program):
    """Clear Pyro's parameter store and return ``(fn, args, kwargs)`` of ``prog``."""
    pyro.clear_param_store()
    return prog.make()


def vipkg_model(prog: Program, fn, args, kwargs, *, quiet: bool = True, **options) -> vipkg.Model:
    """``vipkg.Model.from_pyro`` of the program (``options``: from_pyro's own, e.g. ``enumerate=False``);
    ``quiet`` silences vipkg's UserWarnings (tested apart)."""
    if not quiet:
        return vipkg.Model.from_pyro(fn, *args, name=prog.name, **options, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return vipkg.Model.from_pyro(fn, *args, name=prog.name, **options, **kwargs)


def prior_latents(fn, args, kwargs) -> dict[str, torch.Tensor]:
    """One draw of every latent sample site from the prior (Pyro's own trace)."""
    with torch.no_grad():
        tr = poutine.trace(fn).get_trace(*args, **kwargs)
    return {n: s["value"].detach() for n, s in tr.nodes.items() if _is_sample(s) and not s["is_observed"]}


def pyro_log_joint(fn, args, kwargs, values) -> torch.Tensor:
    """Pyro's log joint at ``values``: ``trace(condition(fn, values)).log_prob_sum()``."""
    with torch.no_grad():
        tr = poutine.trace(poutine.condition(fn, data=values)).get_trace(*args, **kwargs)
        return tr.log_prob_sum()


# Torch is seeded with EVAL_SEED before every evaluation, Pyro's and vipkg's alike, so that
# subsampled plates draw the same minibatch in both.
EVAL_SEED = 4321
DRAW_SEED = 1000
PARTICLE_COUNTS = (1, 3, 7)


def pyro_reference(fn, args, kwargs, values) -> float:
    torch.manual_seed(EVAL_SEED)
    return float(pyro_log_joint(fn, args, kwargs, values))


def pyro_enum_reference(fn, args, kwargs, values, max_plate_nesting: int) -> float:
    """Pyro's log joint at ``values`` with every other (enumerated) site summed out: minus
    ``TraceEnum_ELBO``'s loss of the program conditioned on ``values`` with an empty guide."""
    from pyro.infer import TraceEnum_ELBO

    torch.manual_seed(EVAL_SEED)
    elbo = TraceEnum_ELBO(max_plate_nesting=max_plate_nesting)
    with torch.no_grad():
        return -elbo.loss(poutine.condition(fn, data=values), lambda *a, **k: None, *args, **kwargs)


def prior_draws(fn, args, kwargs, k: int, start: int = 0) -> list[dict]:
    """``k`` prior draws, each with a finite Pyro log joint (heavy-tailed programs can overflow)."""
    out, seed = [], DRAW_SEED + start
    while len(out) < k:
        if seed >= DRAW_SEED + start + 50 * k:
            raise RuntimeError("no prior draw with a finite Pyro log joint in 50 tries")
        torch.manual_seed(seed)
        seed += 1
        values = prior_latents(fn, args, kwargs)
        if math.isfinite(pyro_reference(fn, args, kwargs, values)):
            out.append(values)
    return out


@dataclasses.dataclass
class LogJointCheck:
    """vipkg's log joint against Pyro's for ``S`` prior draws evaluated as ``S`` particles at once."""

    S: int
    got: torch.Tensor
    expected: torch.Tensor

    @property
    def max_rel_err(self) -> float:
        return float(((self.got - self.expected).abs() / self.expected.abs().clamp(min=1.0)).max())

    def bad(self, rtol: float, atol: float) -> torch.Tensor:
        return (self.got - self.expected).abs() > atol + rtol * self.expected.abs()


def _subsample_indices(fn, args, kwargs, plates) -> dict[str, torch.Tensor]:
    """The subsample indices Pyro draws for each of ``plates`` in one (seeded) trace of ``fn``."""
    from pyro.poutine.subsample_messenger import _Subsample

    torch.manual_seed(EVAL_SEED)
    with torch.no_grad():
        tr = poutine.trace(fn).get_trace(*args, **kwargs)
    return {n: s["value"] for n, s in tr.nodes.items() if isinstance(s.get("fn"), _Subsample) and n in plates}


def compare_log_joint(model, fn, args, kwargs, counts=PARTICLE_COUNTS) -> list[LogJointCheck]:
    """For each ``S`` in ``counts``: ``S`` fresh prior draws stacked on a new leading dim, vipkg's
    ``model.log_joint`` of the stack, and Pyro's log joint of each draw alone.

    A model with local latent sites in subsampled plates (``model.local_sites``) is compared on one
    minibatch: Pyro's own subsample indices of a seeded trace, fixed in every Pyro trace by conditioning
    the plates' subsample sites on them, and ``model.minibatch(indices)`` on vipkg's side.
    Raises ``AssertionError`` when vipkg's sites (names, shapes) are not Pyro's.
    """
    indices = {}
    if getattr(model, "local_sites", None):
        indices = _subsample_indices(fn, args, kwargs, model.plates)
        assert set(indices) == set(model.plates), (
            f"vipkg's subsampled plates {sorted(model.plates)} are not Pyro's {sorted(indices)}"
        )
        model = model.minibatch(indices)
        fn = poutine.condition(fn, data=indices)
    out, start = [], 0
    for S in counts:
        draws = prior_draws(fn, args, kwargs, S, start)
        start += 50 * S
        enumerated = set(getattr(getattr(model, "enumeration", None), "sites", ()))
        assert set(model.sites) | enumerated == set(draws[0]) and not set(model.sites) & enumerated, (
            f"vipkg's latent sites {sorted(model.sites)} (and enumerated {sorted(enumerated)}) are not "
            f"Pyro's {sorted(draws[0])}"
        )
        for name, site in model.sites.items():
            assert tuple(site.shape) == tuple(draws[0][name].shape), (
                f"site {name!r}: vipkg's shape {tuple(site.shape)}, Pyro's {tuple(draws[0][name].shape)}"
            )
        if enumerated:
            # The enumerated sites are summed out: Pyro's TraceEnum_ELBO at the other sites' values.
            mpn = max_plate_nesting(fn, args, kwargs)
            draws = [{k: v for k, v in d.items() if k in model.sites} for d in draws]
            expected = torch.tensor(
                [pyro_enum_reference(fn, args, kwargs, d, mpn) for d in draws], dtype=torch.float64
            )
        else:
            expected = torch.tensor([pyro_reference(fn, args, kwargs, d) for d in draws], dtype=torch.float64)
        stacked = {name: torch.stack([d[name] for d in draws]) for name in model.sites}
        torch.manual_seed(EVAL_SEED)
        with torch.no_grad():
            got = model.log_joint(stacked).detach().double()
        assert got.shape == (S,), f"log_joint of {S} particles has shape {tuple(got.shape)}"
        out.append(LogJointCheck(S, got, expected))
    return out


def max_plate_nesting(fn, args, kwargs) -> int:
    """The deepest plate dim (and batch rank of any site) of one trace of ``fn``."""
    with torch.no_grad():
        tr = poutine.trace(fn).get_trace(*args, **kwargs)
    nesting = 0
    for s in tr.nodes.values():
        if not _is_sample(s):
            continue
        nesting = max(nesting, len(s["fn"].batch_shape))
        for f in s["cond_indep_stack"]:
            if f.vectorized and f.dim is not None:
                nesting = max(nesting, -f.dim)
    return nesting


@dataclasses.dataclass
class ElboEstimate:
    """Mean and Monte Carlo standard error of an ELBO estimate from ``n`` draws."""

    mean: float
    se: float
    n: int


def mean_elbo(estimates) -> tuple[float, float]:
    """The mean of several ELBO estimates (e.g. one per seed) and its Monte Carlo standard error."""
    k = len(estimates)
    return sum(e.mean for e in estimates) / k, math.sqrt(sum(e.se**2 for e in estimates)) / k


@torch.no_grad()
def vipkg_elbo(model, guide, n: int = 4000, seed: int = 0) -> ElboEstimate:
    """``mean(log p(x, z) - log q(z))`` over ``n`` draws of a fitted vipkg guide (as ``psis_khat`` draws)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        z, log_q = guide.sample_and_log_prob((n,))
        lw = (guide.log_joint(model, z) - log_q).double()
    return ElboEstimate(float(lw.mean()), float(lw.std() / math.sqrt(n)), n)


#: Pyro's ``Trace_ELBO`` guesses ``max_plate_nesting`` from the trace and then refuses batch dims that no
#: plate declares (the plate-less MCMC test models); ``max_plate_nesting=0`` is what makes them run.
PYRO_NESTING_LADDER = (None, 0)


def fit_pyro_autonormal(
    fn, args, kwargs, *, steps: int, lr: float, seed: int, freeze_params: bool = False, num_particles: int = 1
):
    """Pyro's own recipe: ``SVI(fn, AutoNormal(fn), Adam(lr), Trace_ELBO())`` for ``steps`` steps.

    ``Trace_ELBO()`` first, then ``Trace_ELBO(max_plate_nesting=0)`` if Pyro refuses the program's
    shapes (see :data:`PYRO_NESTING_LADDER`). With ``freeze_params`` the model's own ``pyro.param``
    sites are hidden from SVI (``poutine.block(hide_types=["param"])``), so they stay at their initial
    values. Returns ``(guide, losses, max_plate_nesting used)``; raises what Pyro raised
    when no rung works.
    """
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal
    from pyro.optim import Adam

    model = poutine.block(fn, hide_types=["param"]) if freeze_params else fn
    error = None
    for nesting in PYRO_NESTING_LADDER:
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        guide = AutoNormal(model)
        elbo = Trace_ELBO(num_particles=num_particles)
        if nesting is not None:
            elbo = Trace_ELBO(num_particles=num_particles, max_plate_nesting=nesting)
        svi = SVI(model, guide, Adam({"lr": lr}), elbo)
        try:
            losses = [svi.step(*args, **kwargs)]
        except (ValueError, RuntimeError) as exc:
            error = error or exc
            continue
        losses += [svi.step(*args, **kwargs) for _ in range(steps - 1)]
        return guide, losses, nesting
    raise error


def autonormal_as_vipkg_guide(model, guide):
    """A vipkg ``MeanFieldNormal`` equal to a fitted Pyro ``AutoNormal``.

    Both are diagonal Gaussians over each site's ``biject_to(support)``-unconstrained value, so the
    AutoNormal's per-site ``loc`` / ``scale`` concatenated in ``model.sites`` order are the same
    distribution over vipkg's flat vector; evaluating it with :func:`vipkg_elbo` scores Pyro's fit
    with the same estimator, draws and log density as vipkg's.
    """
    from vipkg.guides import MeanFieldNormal

    locs, scales = [], []
    for name in model.sites:
        loc, scale = guide._get_loc_and_scale(name)
        locs.append(loc.detach().reshape(-1))
        scales.append(scale.detach().reshape(-1))
    loc, scale = torch.cat(locs), torch.cat(scales)
    return MeanFieldNormal(model, loc=loc, scale=scale, dtype=loc.dtype)


@dataclasses.dataclass
class FitComparison:
    """ELBOs (one per seed) of vipkg's and Pyro's fits after equal steps; ``pyro_error`` when Pyro failed."""

    vipkg: list
    pyro: list
    pyro_error: BaseException | None
    initial: ElboEstimate | None = None


def compare_fit(
    prog, model, fn, args, kwargs, *, steps: int, lr: float, seeds, n_eval: int, num_particles: int = 1
) -> FitComparison:
    """``MeanFieldNormal`` + ``Reparam`` in vipkg against Pyro's ``AutoNormal`` SVI, same steps and lr.

    Both fitted guides are scored by :func:`vipkg_elbo` with the same ``n_eval`` draws of the noise
    (Pyro's through :func:`autonormal_as_vipkg_guide`). Model-side parameters (``pyro.param``,
    ``pyro.module``) stay at their initial values on both sides (vipkg ``model_lr=0``, Pyro
    ``freeze_params``), so both fit a guide to the same model. When Pyro cannot run the program,
    ``initial`` holds the ELBO of vipkg's starting guide instead.
    """
    from vipkg.guides import MeanFieldNormal

    ours, theirs, pyro_error = [], [], None
    # Both fit the guide to the same model: the model's own parameters stay at their initial values
    # (vipkg learns them by default, at model_lr; Pyro's SVI would learn them in its global store).
    frozen = {"model_lr": 0.0} if getattr(model, "has_parameters", False) else {}
    for seed in seeds:
        res = vipkg.fit(
            model,
            MeanFieldNormal(model),
            vipkg.Reparam(),
            steps=steps,
            num_particles=num_particles,
            lr=lr,
            seed=seed,
            progress=False,
            **frozen,
        )
        if not bool(torch.isfinite(res.losses).all()):
            raise FloatingPointError(f"vipkg fit (seed {seed}): non-finite losses")
        # res.model: the fitted model (with its learned parameters once vipkg learns model parameters).
        ours.append(vipkg_elbo(res.model, res.guide, n_eval, seed=EVAL_SEED))
        try:
            guide, _, _ = fit_pyro_autonormal(
                fn,
                args,
                kwargs,
                steps=steps,
                lr=lr,
                seed=seed,
                freeze_params="params" in prog.tags,
                num_particles=num_particles,
            )
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            pyro_error = exc
            continue
        finally:
            pyro.clear_param_store()
        theirs.append(vipkg_elbo(model, autonormal_as_vipkg_guide(model, guide), n_eval, seed=EVAL_SEED))
    initial = None
    if pyro_error is not None:
        initial = vipkg_elbo(model, MeanFieldNormal(model), n_eval, seed=EVAL_SEED)
    return FitComparison(ours, theirs, pyro_error, initial)
