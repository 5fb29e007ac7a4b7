"""Every estimator exported by :mod:`vipkg.estimators` has a case of the estimator contract
(:mod:`tests.estimators.contract`) in some estimator test module."""

from __future__ import annotations

import importlib
import inspect
import pathlib
import sys

import pytest

import vipkg.estimators as estimators
from tests.estimators.contract import Case, EstimatorContract
from tests.helpers import exported_estimator_classes
from vipkg.estimators import Estimator

HERE = pathlib.Path(__file__).parent


def _contract_classes():
    """Every ``EstimatorContract`` subclass in the test modules of this folder, imported under the
    names pytest gives them (the folder is on ``sys.path``: no ``__init__.py``)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    out = []
    for path in sorted(HERE.glob("test_*.py")):
        module = importlib.import_module(path.stem)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(obj, EstimatorContract)
                and obj is not EstimatorContract
                and obj.__module__ == path.stem
            ):
                out.append(obj)
    return out


def _cases() -> list[Case]:
    return [case for cls in _contract_classes() for case in cls.cases]


@pytest.mark.parametrize("cls", exported_estimator_classes(), ids=lambda c: c.__name__)
def test_every_exported_estimator_has_a_contract_case(cls):
    covered = {case.estimator_class for case in _cases()}
    assert cls in covered, (
        f"{cls.__name__} is exported from vipkg.estimators but no estimator test module has a case of "
        "the estimator contract for it: add a Case to a `class Test...Contract(EstimatorContract)` in "
        "its tests/estimators/test_*.py (see tests/estimators/contract.py)."
    )


def test_case_ids_are_unique_and_every_case_says_what_it_checks():
    cases = _cases()
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    for c in cases:
        assert c.exact or c.reference or c.no_exact, c.id
        assert c.no_exact is not None or c.biased is not None or c.shift is not None, c.id


def test_the_coverage_check_sees_a_missing_estimator():
    class Uncovered(Estimator):
        def estimate(self, model, guide, objective, num_particles):  # pragma: no cover
            raise NotImplementedError

    assert Uncovered not in {case.estimator_class for case in _cases()}
    assert {estimators.Reparam, estimators.SVGD, estimators.PerSite} <= {c.estimator_class for c in _cases()}
