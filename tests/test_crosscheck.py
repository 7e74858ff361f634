import numpy as np

from poisonguard.crosscheck import (
    changed_indices,
    class_vs_target,
    flags_vs_provenance,
    runtime_vs_scan,
    trigger_vs_mask,
)


def test_class_vs_target():
    assert class_vs_target([3], 3)["agree"] is True
    assert class_vs_target([], None)["agree"] is True
    assert class_vs_target([3], 5)["agree"] is False
    only_scan = class_vs_target([3], None)
    assert only_scan["agree"] is False and "no backdoor" in only_scan["detail"]
    assert class_vs_target([], 4)["agree"] is False


def test_flags_vs_provenance_reads_sample_keys():
    findings = [{"kind": "modified", "key": "x[3]"}, {"kind": "modified", "key": "x[7]"},
                {"kind": "new", "key": "x[99]"}, {"kind": "modified", "key": "cat/001.png"}]
    assert changed_indices(findings).tolist() == [3, 7]
    flags = np.zeros(10, bool)
    flags[[3, 7, 8]] = True
    out = flags_vs_provenance(flags, findings)
    assert out["agree"] is True and out["n_both"] == 2 and out["changed_and_flagged"] == [3, 7]
    flags[:] = False
    assert flags_vs_provenance(flags, findings)["agree"] is False
    assert flags_vs_provenance(flags, [])["agree"] is True


def test_runtime_vs_scan():
    s = np.zeros(20, bool)
    s[:5] = True
    r = s.copy()
    r[10] = True
    out = runtime_vs_scan(r, s)
    assert out["agree"] is True and out["n_both"] == 5 and out["jaccard"] == round(5 / 6, 4)
    assert runtime_vs_scan(np.zeros(20, bool), s)["agree"] is None
    assert runtime_vs_scan(np.zeros(20, bool), np.zeros(20, bool))["agree"] is True


def test_trigger_vs_mask():
    scan = np.zeros((8, 8))
    scan[6:, 6:] = 1
    rev = np.zeros((8, 8))
    rev[6:, 6:] = 0.9
    assert trigger_vs_mask(scan, rev)["iou"] == 1.0
    far = np.zeros((8, 8))
    far[:2, :2] = 0.9
    assert trigger_vs_mask(scan, far)["agree"] is False
    assert trigger_vs_mask(None, rev)["agree"] is None
