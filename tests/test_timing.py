"""fastrun.measure.timing: interleaved rounds, in shuffled order, call by call or in settled blocks."""
import time

from fastrun.measure import timing


def sleeper(seconds: float, log: list, name: str):
    def run():
        log.append(name)
        time.sleep(seconds)
    return run


def test_fast_runners_are_timed_in_blocks_after_as_many_untimed_calls():
    log: list = []
    times = timing.interleaved({"fast": sleeper(0.0005, log, "fast"), "slow": sleeper(0.008, log, "slow")},
                               repeats=3, block_seconds=0.01)
    fast_calls, slow_calls = log.count("fast"), log.count("slow")
    # fast: a warm-up and a sizing call, then per round SETTLE_BLOCKS blocks untimed and one timed
    per_round = (fast_calls - 2) / 3
    assert per_round == int(per_round) and per_round >= (timing.SETTLE_BLOCKS + 1) * 2
    # slower than half a block: per round one timed call after untimed ones lasting SETTLE_BLOCKS blocks
    per_round = (slow_calls - 2) / 3
    assert per_round == int(per_round) and timing.SETTLE_BLOCKS + 1 <= per_round <= timing.SETTLE_BLOCKS + 2
    assert 0.45 <= times["fast"] <= 4 and 7 <= times["slow"] <= 30  # per call, in ms


def test_call_by_call_without_blocks_and_no_runner_always_follows_the_same_one():
    log: list = []
    names = ["a", "b", "c"]
    timing.interleaved({n: sleeper(0.0, log, n) for n in names}, repeats=30)
    assert log[:3] == names and len(log) == 3 + 30 * 3  # one warm-up each, one call per round
    rounds = log[3:]
    followers = {n: {rounds[i + 1] for i in range(len(rounds) - 1) if rounds[i] == n} - {n} for n in names}
    assert all(len(f) == 2 for f in followers.values()), followers
