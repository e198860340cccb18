"""fastrun.measure.timing: interleaved rounds, in shuffled order, call by call or in settled blocks."""
import time

from fastrun.measure import timing


def sleeper(seconds: float, log: list, name: str):
    def run():
        log.append(name)
        time.sleep(seconds)
    return run


def test_the_settle_is_three_calls_worth_within_its_bounds():
    low, high = timing.SETTLE_SECONDS
    untimed, timed = timing.block_calls(20e-6, 0.01)  # microseconds: the lower bound of settling
    assert abs(untimed * 20e-6 - low) <= 20e-6 and abs(timed * 20e-6 - 0.01) <= 20e-6
    assert timing.block_calls(0.007, 0.01) == (timing.SETTLE_CALLS, 1)
    assert timing.block_calls(0.02, 0.01) == (2, 1)  # three calls' worth, cut to the upper bound
    assert timing.block_calls(0.3, 0.01) == (0, 1)  # past the upper bound: timed call by call
    assert high < 0.3


def test_fast_runners_are_timed_in_blocks_after_untimed_calls():
    log: list = []
    times = timing.interleaved({"fast": sleeper(0.0005, log, "fast"), "slow": sleeper(0.008, log, "slow")},
                               repeats=3, block_seconds=0.01)
    fast_calls, slow_calls = log.count("fast"), log.count("slow")
    # a warm-up and a sizing call, then per round the untimed calls and a timed block
    per_round = (fast_calls - 2) / 3
    assert per_round == int(per_round) and per_round >= 2 + 2
    assert slow_calls == 2 + 3 * (timing.SETTLE_CALLS + 1)  # 3 x 8 ms of settle is within the bounds
    assert 0.45 <= times["fast"] <= 4 and 7 <= times["slow"] <= 40  # per call, in ms


def test_call_by_call_without_blocks_and_no_runner_always_follows_the_same_one():
    log: list = []
    names = ["a", "b", "c"]
    timing.interleaved({n: sleeper(0.0, log, n) for n in names}, repeats=30)
    assert log[:3] == names and len(log) == 3 + 30 * 3  # one warm-up each, one call per round
    rounds = log[3:]
    followers = {n: {rounds[i + 1] for i in range(len(rounds) - 1) if rounds[i] == n} - {n} for n in names}
    assert all(len(f) == 2 for f in followers.values()), followers
