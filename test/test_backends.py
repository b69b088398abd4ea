"""Every registered backend has a case of the shared contract (backend_contract.py).

Each backend's case and its ``BackendContract`` subclass live in that backend's test module
(test_models_<backend>.py), next to its own tests.
"""

from test_models_cpal import CPAL_CASE
from test_models_fusionsam import FUSIONSAM_CASE
from test_models_sartm import SARTM_CASE
from test_models_segrgbx import SEGRGBX_CASE

from rgbt_seg_ros.models import available_backends


def test_every_registered_backend_has_a_contract_case():
    cases = (SARTM_CASE, CPAL_CASE, FUSIONSAM_CASE, SEGRGBX_CASE)
    assert set(available_backends()) == {case.name for case in cases}
    assert len({case.name for case in cases}) == len(cases)
