"""The pure Cosmos x/gov tally on crafted cases (figures follow x/gov/keeper/tally.go, SDK v0.50)."""

from decimal import Decimal

import pytest

from governance.tally import tally_votes

D = Decimal


def votes(yes=0, no=0, abstain=0, veto=0):
    return {"yes": D(yes), "no": D(no), "abstain": D(abstain), "no_with_veto": D(veto)}


def test_quorum_missed_fails_even_if_everyone_voting_says_yes():
    result = tally_votes(votes(yes=333), 1000)
    assert result.status == "failed"
    assert not result.quorum_reached
    assert result.turnout == D("0.333")
    assert result.yes_ratio == 1


def test_turnout_exactly_at_quorum_reaches_it():
    result = tally_votes(votes(yes=334), 1000)
    assert result.quorum_reached and result.status == "passed"


def test_all_abstain_fails_even_with_quorum():
    result = tally_votes(votes(abstain=900), 1000)
    assert result.quorum_reached
    assert result.status == "failed"
    assert result.yes_ratio is None and result.reason == "every vote cast was Abstain"


def test_veto_above_a_third_of_votes_cast_vetoes_even_with_a_yes_majority():
    result = tally_votes(votes(yes=600, veto=335), 1000)
    assert result.veto_reached and result.status == "vetoed"
    assert result.veto_ratio == (D(335) / D(935)).quantize(D("0.000001"))


def test_veto_exactly_at_threshold_does_not_veto():
    # 334 of 1000 cast is exactly 0.334: Cosmos vetoes only strictly above.
    result = tally_votes(votes(yes=666, veto=334), 1000)
    assert not result.veto_reached and result.status == "passed"


def test_yes_exactly_half_of_non_abstaining_is_rejected():
    result = tally_votes(votes(yes=300, no=300, abstain=100), 1000)
    assert result.yes_ratio == D("0.5")
    assert not result.threshold_reached and result.status == "rejected"


def test_abstain_is_left_out_of_the_threshold_denominator():
    result = tally_votes(votes(yes=301, no=300, abstain=399), 1000)
    assert result.status == "passed"


def test_yes_just_above_half_passes_exactly_with_decimals():
    result = tally_votes({"yes": D("500.000001"), "no": D("500")}, D("1000.000001"))
    assert result.status == "passed"


def test_expedited_needs_two_thirds():
    assert tally_votes(votes(yes=660, no=340), 1000, expedited=True).status == "rejected"
    assert tally_votes(votes(yes=660, no=340), 1000).status == "passed"
    assert tally_votes(votes(yes=668, no=332), 1000, expedited=True).status == "passed"
    assert tally_votes(votes(yes=667, no=333), 1000, expedited=True).threshold == D("0.667")


def test_no_voting_power_at_all_fails():
    result = tally_votes(votes(), 0)
    assert result.status == "failed" and result.turnout == 0


def test_custom_rules_are_used():
    result = tally_votes(votes(yes=200, no=100), 1000, quorum=D("0.2"), threshold=D("0.7"))
    assert result.quorum_reached and result.status == "rejected"


def test_figures_are_json_safe():
    data = tally_votes(votes(yes=700, no=100, abstain=50, veto=50), 1000).as_dict()
    assert data["status"] == "passed"
    assert data["power"] == {"yes": "700", "no": "100", "abstain": "50", "no_with_veto": "50"}
    assert data["turnout"] == "0.900000" and data["quorum_reached"] is True


@pytest.mark.parametrize("bad", [{"maybe": D(1)}, {"yes": D(-1)}])
def test_programming_errors_are_refused(bad):
    with pytest.raises(ValueError):
        tally_votes(bad, 10)


def test_more_votes_than_power_is_an_error():
    with pytest.raises(ValueError, match="exceed"):
        tally_votes(votes(yes=11), 10)
