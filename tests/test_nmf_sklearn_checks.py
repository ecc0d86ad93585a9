"""scikit-learn's own estimator checks on captum_nmf.NMF (numpy inputs)."""

from __future__ import annotations

from sklearn.utils.estimator_checks import parametrize_with_checks

from captum_nmf import NMF

# Checks that do not apply, with the reason.
EXPECTED_FAILED_CHECKS: dict[str, str] = {}


@parametrize_with_checks(
    [NMF(n_components=1, random_state=0, max_iter=50)],
    expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS,
)
def test_sklearn_compatible_estimator(estimator, check) -> None:  # type: ignore[no-untyped-def]
    check(estimator)
