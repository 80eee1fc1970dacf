"""The token bucket: rates, bursts, and a limit that changes while it runs."""

from __future__ import annotations

import threading
import time

import pytest

from exlab_wizard.sync import throttle as throttle_module
from exlab_wizard.sync.throttle import TokenBucket

KIB = 1024
MIB = 1 << 20


class FakeTime:
    """A clock that moves only when slept on (or advanced by the test)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.naps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.naps.append(seconds)
        self.now += seconds

    def elapsed(self) -> float:
        return self.now - 1000.0


def _bucket(fake: FakeTime, limit_fn, **kwargs) -> TokenBucket:
    return TokenBucket(limit_fn, clock=fake.clock, sleep=fake.sleep, **kwargs)


def test_unlimited_never_sleeps() -> None:
    fake = FakeTime()
    bucket = _bucket(fake, lambda: None)
    for _ in range(100):
        bucket.consume(MIB)
    assert fake.naps == [] and bucket.bytes_passed == 100 * MIB


@pytest.mark.parametrize(
    ("limit_kibps", "total", "block"),
    [(100, MIB, 64 * KIB), (1000, 10 * MIB, MIB), (1, 8 * KIB, 1 * KIB), (6103, 50 * MIB, MIB)],
)
def test_rate_equals_the_limit(limit_kibps: int, total: int, block: int) -> None:
    fake = FakeTime()
    bucket = _bucket(fake, lambda: limit_kibps)
    for _ in range(total // block):
        bucket.consume(block)
    # no credit at the start: exactly total / rate
    assert fake.elapsed() == pytest.approx(total / (limit_kibps * KIB), rel=1e-6)
    assert max(fake.naps) <= 0.5 + 1e-9


def test_burst_after_an_idle_spell_is_capped() -> None:
    fake = FakeTime()
    bucket = _bucket(fake, lambda: 400, burst_s=0.25)  # 100 KiB of burst
    bucket.consume(1)
    fake.now += 60  # idle for a minute: the credit is still only burst_s worth
    start = fake.now
    bucket.consume(100 * KIB - 1)
    assert fake.now == start  # the burst goes at once
    bucket.consume(400 * KIB)
    assert fake.now - start == pytest.approx(1.0, abs=1e-5)  # one byte of credit was left


def test_limit_lifted_mid_transfer_takes_effect_while_waiting() -> None:
    fake = FakeTime()
    bucket = _bucket(fake, lambda: 10 if fake.elapsed() < 2.0 else None)  # window closes at t=2 s
    bucket.consume(10 * MIB)  # ~1024 s at 10 KiB/s
    assert 2.0 <= fake.elapsed() <= 2.5 + 1e-9


def test_limit_imposed_mid_transfer_is_read_within_half_a_second() -> None:
    fake = FakeTime()
    reads: list[float] = []

    def limit() -> int | None:
        reads.append(fake.elapsed())
        return None if fake.elapsed() < 3.0 else 100  # window opens at t=3 s

    bucket = _bucket(fake, limit)
    sent_at: list[tuple[float, int]] = []
    for _ in range(200):
        fake.now += 0.05  # the network takes 50 ms per unlimited block
        bucket.consume(64 * KIB)
        sent_at.append((fake.elapsed(), bucket.bytes_passed))
    # every read while unlimited was at most 0.5 s after the previous one
    assert all(b - a <= 0.5 + 0.05 + 1e-9 for a, b in zip(reads, reads[1:], strict=False))
    limited_from = min(t for t in reads if t >= 3.0)
    assert limited_from <= 3.5 + 1e-9
    # after the window opened the average rate is the limit
    after = [(t, n) for t, n in sent_at if t > limited_from + 1.0]
    (t0, n0), (t1, n1) = after[0], after[-1]
    assert (n1 - n0) / (t1 - t0) == pytest.approx(100 * KIB, rel=0.05)


def test_limit_raised_mid_transfer() -> None:
    fake = FakeTime()
    bucket = _bucket(fake, lambda: 100 if fake.elapsed() < 5.0 else 1000)
    bucket.consume(500 * KIB)  # 5 s at 100 KiB/s, then the rest is at 1000 KiB/s
    assert fake.elapsed() == pytest.approx(5.0, abs=0.01)
    bucket.consume(1000 * KIB)
    assert fake.elapsed() == pytest.approx(6.0, abs=0.51)


def test_a_limit_below_one_counts_as_one() -> None:
    fake = FakeTime()
    bucket = _bucket(fake, lambda: 0)
    bucket.consume(2 * KIB)
    assert fake.elapsed() == pytest.approx(2.0)
    assert bucket.limit_kibps == 1


def test_exception_from_sleep_cancels_the_wait() -> None:
    class Cancelled(Exception):
        pass

    def cancelling_sleep(_seconds: float) -> None:
        raise Cancelled

    bucket = TokenBucket(lambda: 1, sleep=cancelling_sleep)
    with pytest.raises(Cancelled):
        bucket.consume(MIB)
    bucket2 = TokenBucket(lambda: None, sleep=cancelling_sleep)
    bucket2.consume(MIB)  # unlimited: never sleeps


def test_real_time_two_threads_share_the_limit() -> None:
    limit_kibps = 512
    bucket = TokenBucket(lambda: limit_kibps, burst_s=0.25)
    per_thread = 192 * KIB

    def send() -> None:
        for _ in range(per_thread // (16 * KIB)):
            bucket.consume(16 * KIB)

    start = time.monotonic()
    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    expected = 2 * per_thread / (limit_kibps * KIB)  # 0.75 s, no initial credit
    assert expected * 0.9 <= elapsed <= expected + 0.5
    assert bucket.bytes_passed == 2 * per_thread


def test_module_exports() -> None:
    assert throttle_module.__all__ == ["TokenBucket"]
