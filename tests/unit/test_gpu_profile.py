"""The profile's reading of a trace (benchmarks/gpu_profile.py), on a hand-made one: kernels on
overlapping streams count once, and the gaps are where no kernel runs."""

from benchmarks.gpu_profile import kernel_gaps


def test_kernel_gaps_merge_overlaps_and_find_the_idle_time():
    kernels = [
        {"ts": 0, "dur": 10},
        {"ts": 5, "dur": 10},  # overlaps the first (another stream): busy 0-15
        {"ts": 40, "dur": 5},  # a 25 µs gap before it
        {"ts": 46, "dur": 4},  # a 1 µs gap
        {"ts": 46, "dur": 1},  # inside the previous one
    ]
    g = kernel_gaps(kernels, top=1)
    assert g["busy"] == 15 + 5 + 4
    assert g["span"] == 50 and g["idle"] == 26
    assert g["gaps"] == [(15.0, 25.0)] and g["count"] == 5


def test_no_kernels_is_no_time():
    assert kernel_gaps([]) == {"busy": 0.0, "span": 0.0, "idle": 0.0, "gaps": [], "count": 0}
