"""daemon.sample_ledger: the sample ledger a checkpoint and an adapter manifest carry."""

from __future__ import annotations

import random

from daemon.sample_ledger import SampleLedger, check_ledger, count_lines, ranges_of


def test_ranges_coalesce_in_any_order_and_stay_compact() -> None:
    lines = [x for x in range(1, 2001) if x % 97]  # holes, as held-out and bad lines make
    random.Random(3).shuffle(lines)
    ledger = SampleLedger()
    for i in range(0, len(lines), 4):
        ledger.add_step(0, lines[i:i + 4])
    d = ledger.to_dict()
    [epoch] = d["epochs"]
    assert epoch["lines"] == ranges_of(lines) and len(epoch["lines"]) == 21
    assert count_lines(epoch["lines"]) == epoch["samples"] == len(lines)
    assert d["steps"] == epoch["steps"] == len(lines) // 4 == 495
    assert check_ledger(d, lines, epochs=1, steps=495) == []


def test_round_trip_continues_the_same_digest() -> None:
    straight, resumed = SampleLedger(), SampleLedger()
    steps = [(0, [3, 1]), (0, [2, 4]), (1, [4, 2]), (1, [1, 3])]
    for epoch, lines in steps:
        straight.add_step(epoch, lines)
    for epoch, lines in steps[:3]:
        resumed.add_step(epoch, lines)
    resumed = SampleLedger.from_dict(resumed.to_dict())
    resumed.add_step(*steps[3])
    assert resumed.to_dict() == straight.to_dict()
    assert check_ledger(straight.to_dict(), [1, 2, 3, 4], epochs=2, steps=4) == []


def test_check_names_repeats_gaps_strangers_and_order() -> None:
    ledger = SampleLedger()
    ledger.add_step(0, [1, 2])
    ledger.add_step(0, [2, 3])  # 2 twice, 4 never, 9 is not a train line
    ledger.add_step(0, [9])
    problems = check_ledger(ledger.to_dict(), [1, 2, 3, 4], epochs=2, steps=2)
    assert any("consumed twice" in p for p in problems)
    assert any("missing [[4, 4]]" in p and "not expected [[9, 9]]" in p for p in problems)
    assert any("epochs [0]" in p for p in problems) and any("3 steps" in p for p in problems)
    # The same samples in another order of steps: the sets agree, the digest does not.
    a, b = SampleLedger(), SampleLedger()
    a.add_step(0, [1, 2]); a.add_step(0, [3, 4])  # noqa: E702
    b.add_step(0, [3, 4]); b.add_step(0, [1, 2])  # noqa: E702
    assert a.to_dict()["epochs"][0]["lines"] == b.to_dict()["epochs"][0]["lines"]
    assert a.to_dict()["epochs"][0]["digest"] != b.to_dict()["epochs"][0]["digest"]
    assert check_ledger(None, [1], 1) == ["no ledger"]
    assert check_ledger(SampleLedger(complete=False).to_dict(), [], 0)[0].startswith("incomplete")
