"""The role rule of ``probes.roles`` on hand-made tables: attention proposes, patching decides."""

import pandas as pd
import pytest

from ih_circuits.probes import ProbeConfig
from ih_circuits.probes.roles import assign_roles


def table(**changes):
    """One head in layer 0: dominant offset 2 with a copier lift of 0.1 (too diffuse to be a candidate)."""
    row = {
        "layer": 0,
        "head": 0,
        "offset": 2,
        "copier_score": 0.15,
        "copier_lift": 0.1,
        "offsets": {},
        "induction_lift": 0.0,
    }
    return pd.DataFrame([{**row, **changes}])


@pytest.mark.parametrize(
    ("causal", "role", "evidence"),
    [
        (None, "other", "attention"),
        ({(0, 0): (0.3, (1, 2))}, "copier", "patching"),  # its offset was tested and it carries 0.3
        ({(0, 0): (0.05, (1, 2))}, "other", "attention"),  # below causal_share 0.1
        ({(0, 0): (0.3, (1,))}, "other", "attention"),  # the patch tested offset 1 only
    ],
)
def test_a_diffuse_head_becomes_a_copier_only_by_patching_at_its_offset(causal, role, evidence):
    row = assign_roles(table(), ProbeConfig(), causal).iloc[0]
    assert (row.role, row.evidence) == (role, evidence)
    assert row.offsets == ({2: 0.15} if role == "copier" else {})


def test_a_candidate_that_carries_nothing_is_other_and_layer_zero_is_never_induction():
    candidate = table(copier_lift=0.9, copier_score=0.9, offsets={2: 0.9})
    assert assign_roles(candidate, ProbeConfig()).iloc[0].role == "copier"
    silent = assign_roles(candidate, ProbeConfig(), {(0, 0): (0.0, (2,))}).iloc[0]
    assert (silent.role, silent.evidence) == ("other", "patching: carries nothing")
    assert assign_roles(table(induction_lift=0.9), ProbeConfig()).iloc[0].role == "other"
    assert assign_roles(table(layer=1, induction_lift=0.9), ProbeConfig()).iloc[0].role == "induction"
