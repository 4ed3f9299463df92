"""What a run says about its own speed: the busy-machine warning and the time left."""

from __future__ import annotations

from dglstm_lm.trainer import _duration, load_warning


def test_a_machine_with_more_runnable_work_than_cores_is_called_busy():
    assert load_warning(2.0, 2, 2) is None  # this job's own two threads on two cores
    assert load_warning(2.7, 2, 1) is None  # within the margin
    busy = load_warning(3.4, 2, 2)
    assert busy is not None and "load average 3.4 on 2 cores" in busy and "trainer.threads=1" in busy
    one = load_warning(5.0, 2, 1)
    assert one is not None and "trainer.threads=1" not in one and "fewer jobs at a time" in one


def test_time_left_reads_as_a_person_would_say_it():
    assert [_duration(s) for s in (5, 89, 90, 600, 5399, 5400, 6600, 7199.6)] == [
        "5 s", "89 s", "2 min", "10 min", "90 min", "1 h 30 min", "1 h 50 min", "2 h 00 min",
    ]  # fmt: skip
