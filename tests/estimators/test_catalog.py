"""The estimator catalogue: one configuration at least per exported estimator, and every one builds."""

import pytest
import torch

import vipkg
from tests.helpers import exported_estimator_classes
from vipkg.estimators import Estimator, catalog


@pytest.mark.parametrize("cls", exported_estimator_classes(), ids=lambda c: c.__name__)
def test_every_exported_estimator_has_a_configuration(cls):
    assert cls in catalog.estimator_classes(), (
        f"{cls.__name__} is exported from vipkg.estimators but has no configuration in "
        "vipkg.estimators.catalog.configs(); add one (with an example model it fits), so that "
        "vipkg compare, vipkg fit and the estimator-wide tests see it."
    )
    assert catalog.for_estimator(cls).estimator_class is cls


@pytest.mark.parametrize("label", catalog.labels())
def test_every_configuration_builds_on_its_example_and_steps(label):
    cfg = catalog.get(label)
    model = cfg.example_model()
    assert isinstance(model, vipkg.Model)
    guide, estimator, objective = cfg.build(model, num_particles=4)  # runs the estimator's checks
    assert isinstance(estimator, Estimator) and isinstance(objective, vipkg.objectives.Objective)
    assert cfg.estimator_class is type(estimator)
    assert cfg.lr is None or cfg.lr > 0
    torch.manual_seed(0)
    r = vipkg.fit(
        model,
        guide,
        estimator,
        objective=objective,
        steps=3,
        num_particles=4,
        lr=cfg.lr or 1e-2,
        progress=False,
    )
    assert torch.isfinite(r.losses).all(), label


def test_labels_are_unique_and_looked_up():
    labels = catalog.labels()
    assert len(labels) == len(set(labels))
    assert [c.label for c in catalog.configs()] == labels
    assert catalog.get("stl-fullrank-elbo").estimator_class is vipkg.STL
    with pytest.raises(KeyError, match="reparam-meanfield-elbo"):
        catalog.get("no-such-configuration")
    with pytest.raises(KeyError, match="no configuration for"):
        catalog.for_estimator(type("NotCatalogued", (Estimator,), {"estimate": lambda *a: None}))


def test_configurations_are_fresh_on_every_call():
    """Factories, not instances: two builds share no estimator state or guide parameters."""
    cfg = catalog.get("reparam-meanfield-elbo")
    model = cfg.example_model()
    (g1, e1, _), (g2, e2, _) = cfg.build(model), cfg.build(model)
    assert e1 is not e2 and g1 is not g2
    assert not set(map(id, g1.parameters())) & set(map(id, g2.parameters()))


def test_example_models_take_a_dtype():
    cfg = catalog.get("rsvi1-dirichlet-elbo")
    model = cfg.example_model(dtype=torch.float64)
    assert all(v.dtype == torch.float64 for v in model.data.values() if v.is_floating_point())
