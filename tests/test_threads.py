import pytest
import torch

from poisonguard.errors import ConfigError
from poisonguard.threads import available_cpus, default_threads, set_threads


def test_default_threads_follow_the_cpus_unless_omp_is_set(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_threads() is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == available_cpus() >= 1


def test_set_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1
        with pytest.raises(ConfigError, match="--threads"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)
