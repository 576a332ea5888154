"""Stage plans: the expansion of every method string, and bad plans rejected."""

import pytest

from tfq.precision import METHODS, Stage, format_plan, parse_method, plan_stages


def bits(stages):
    return [(s.w_bits, s.a_bits, s.guided) for s in stages]


EXPECTED = {
    # method: (4-bit target, 2-bit target), as (w, a, guided) per stage
    "baseline": ([(4, 4, False)], [(2, 2, False)]),
    "ts": ([(4, 32, False), (4, 4, False)], [(2, 32, False), (2, 2, False)]),
    "pq": ([(8, 8, False), (4, 4, False)], [(8, 8, False), (4, 4, False), (2, 2, False)]),
    "guided": ([(4, 4, True)], [(2, 2, True)]),
    "pq+ts": (
        [(8, 32, False), (4, 32, False), (4, 8, False), (4, 4, False)],
        [(8, 32, False), (4, 32, False), (2, 32, False), (2, 8, False), (2, 4, False), (2, 2, False)],
    ),
    "ts+guided": ([(4, 32, True), (4, 4, True)], [(2, 32, True), (2, 2, True)]),
    "pq+guided": ([(8, 8, True), (4, 4, True)], [(8, 8, True), (4, 4, True), (2, 2, True)]),
    "pq+ts+guided": (
        [(8, 32, True), (4, 32, True), (4, 8, True), (4, 4, True)],
        [(8, 32, True), (4, 32, True), (2, 32, True), (2, 8, True), (2, 4, True), (2, 2, True)],
    ),
}


@pytest.mark.parametrize("method", sorted(EXPECTED))
@pytest.mark.parametrize("target", [4, 2])
def test_every_method_expands(method, target):
    stages = plan_stages(method, w_bits=target, a_bits=target, epochs=7, lr=0.002)
    assert bits(stages) == EXPECTED[method][0 if target == 4 else 1]
    assert all(s.epochs == 7 and s.lr == 0.002 and s.lr_decay_epochs == 10 for s in stages)
    assert len({s.name for s in stages}) == len(stages)


def test_methods_list_is_covered():
    assert set(METHODS) == set(EXPECTED) | {"fp"}


def test_component_order_does_not_matter():
    assert parse_method("guided+TS+pq") == parse_method("pq+ts+guided")


def test_pretraining_stage_and_its_schedule():
    stages = plan_stages("ts", w_bits=2, a_bits=2, pretrain_epochs=30)
    fp = stages[0]
    assert (fp.name, fp.w_bits, fp.a_bits, fp.epochs, fp.lr, fp.lr_decay_epochs) == ("fp", 32, 32, 30, 0.01, 30)
    assert len(stages) == 3


def test_custom_pq_sequence_and_odd_target():
    assert bits(plan_stages("pq", w_bits=3, a_bits=3, pq_sequence=(32, 16 // 2, 6, 4))) == [
        (8, 8, False), (6, 6, False), (4, 4, False), (3, 3, False)]
    assert bits(plan_stages("pq", w_bits=2, a_bits=4)) == [(8, 8, False), (4, 4, False), (2, 4, False)]


def test_stage_epochs_override_and_mismatch():
    stages = plan_stages("ts", w_bits=4, a_bits=4, stage_epochs=[3, 9])
    assert [s.epochs for s in stages] == [3, 9]
    with pytest.raises(ValueError, match="2 quantized stages"):
        plan_stages("ts", w_bits=4, a_bits=4, stage_epochs=[3])


@pytest.mark.parametrize("bad", ["dorefa", "ts+ts", "baseline+ts", "", "pq+"])
def test_unknown_methods_rejected(bad):
    with pytest.raises(ValueError, match="accepted: fp, baseline, ts, pq"):
        parse_method(bad)


@pytest.mark.parametrize("seq", [(32, 4, 8, 2), (8, 8, 2), (32, 9, 2), ()])
def test_bad_pq_sequences_rejected(seq):
    with pytest.raises(ValueError, match="pq_sequence|1..8"):
        plan_stages("pq", w_bits=2, a_bits=2, pq_sequence=seq)


def test_bad_stage_values_rejected():
    with pytest.raises(ValueError, match="epochs"):
        Stage("x", 4, 4, epochs=0)
    with pytest.raises(ValueError, match="1..8"):
        plan_stages("baseline", w_bits=9, a_bits=4)
    with pytest.raises(ValueError, match="below 32"):
        plan_stages("baseline", w_bits=32, a_bits=32)


def test_format_plan_lists_every_stage():
    text = format_plan(plan_stages("pq+ts+guided", w_bits=4, a_bits=4, pretrain_epochs=5))
    assert text.count("\n") == 2 + 4 and "w4a8_guided" in text and "every 30 epochs" in text
