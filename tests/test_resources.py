import pytest
import torch

from adaptsoup.resources import PeakMemory, current_rss_bytes

pytestmark = pytest.mark.skipif(current_rss_bytes() is None, reason="no /proc/self/statm on this platform")


def test_peak_memory_sees_a_transient_allocation():
    with PeakMemory(interval_s=0.005) as mem:
        big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched so it is resident
        big += 1
        del big
    assert mem.rise_mb >= 60
    assert mem.peak_mb >= mem.rise_mb
    assert set(mem.to_dict()) == {"rss_start_mb", "rss_peak_mb", "rss_rise_mb", "process_max_rss_mb"}


def test_peak_memory_of_nothing_is_small():
    with PeakMemory() as mem:
        pass
    assert 0 <= mem.rise_mb < 16
