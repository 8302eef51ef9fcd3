"""The Cosmos x/gov tally as a pure function (no Django, no settings read).

Mirrors `x/gov/keeper/tally.go` (SDK v0.50), checked in this order:

1. no voting power at all, or turnout (votes cast / total snapshotted power) below the quorum → failed
   (at exactly the quorum the quorum is reached: Cosmos tests `percentVoting.LT(quorum)`);
2. every vote cast is Abstain → failed;
3. NoWithVeto / votes cast strictly above the veto threshold → vetoed;
4. Yes / (votes cast − Abstain) strictly above the threshold (0.5, or 0.667 expedited) → passed;
5. otherwise → rejected (so exactly 0.5 Yes is rejected).

The decisions compare by cross-multiplication in Decimal, so they are exact for any finite inputs;
the ratios returned are for display.
"""

from dataclasses import dataclass, field
from decimal import Decimal, localcontext

OPTIONS = ("yes", "no", "abstain", "no_with_veto")

# Cosmos x/gov defaults (v0.50 params); the settings module passes its own values in.
DEFAULT_QUORUM = Decimal("0.334")
DEFAULT_THRESHOLD = Decimal("0.5")
DEFAULT_VETO_THRESHOLD = Decimal("0.334")
DEFAULT_EXPEDITED_THRESHOLD = Decimal("0.667")

_RATIO_PLACES = Decimal("0.000001")


@dataclass(frozen=True)
class TallyResult:
    status: str  # passed | rejected | vetoed | failed
    reason: str
    power: dict = field(default_factory=dict)  # option -> Decimal voting power
    total_power: Decimal = Decimal(0)
    cast: Decimal = Decimal(0)
    turnout: Decimal = Decimal(0)  # cast / total_power
    quorum: Decimal = DEFAULT_QUORUM
    quorum_reached: bool = False
    threshold: Decimal = DEFAULT_THRESHOLD
    yes_ratio: Decimal | None = None  # yes / (cast - abstain); None when nobody voted other than abstain
    threshold_reached: bool = False
    veto_threshold: Decimal = DEFAULT_VETO_THRESHOLD
    veto_ratio: Decimal | None = None  # no_with_veto / cast; None when nothing was cast
    veto_reached: bool = False
    expedited: bool = False

    @property
    def passed(self):
        return self.status == "passed"

    def as_dict(self):
        """JSON-safe form (Decimals as strings) for storage and the API."""

        def text(value):
            return None if value is None else str(value)

        def plain(value):  # 150.00000000 -> "150", without exponent notation
            return format(value.normalize(), "f") if value else "0"

        return {
            "status": self.status,
            "reason": self.reason,
            "power": {option: plain(self.power.get(option, Decimal(0))) for option in OPTIONS},
            "total_power": plain(self.total_power),
            "cast": plain(self.cast),
            "turnout": str(self.turnout),
            "quorum": str(self.quorum),
            "quorum_reached": self.quorum_reached,
            "threshold": str(self.threshold),
            "yes_ratio": text(self.yes_ratio),
            "threshold_reached": self.threshold_reached,
            "veto_threshold": str(self.veto_threshold),
            "veto_ratio": text(self.veto_ratio),
            "veto_reached": self.veto_reached,
            "expedited": self.expedited,
        }


def _ratio(numerator, denominator):
    with localcontext() as ctx:
        ctx.prec = 40
        return (numerator / denominator).quantize(_RATIO_PLACES)


def tally_votes(
    power_by_option,
    total_power,
    expedited=False,
    *,
    quorum=DEFAULT_QUORUM,
    threshold=DEFAULT_THRESHOLD,
    veto_threshold=DEFAULT_VETO_THRESHOLD,
    expedited_threshold=DEFAULT_EXPEDITED_THRESHOLD,
):
    """Tallies voting power per option ("yes", "no", "abstain", "no_with_veto") against the total
    snapshotted power. Unknown options or negative power are programming errors (ValueError)."""
    unknown = set(power_by_option) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown vote options: {sorted(unknown)}")
    power = {option: Decimal(power_by_option.get(option, 0)) for option in OPTIONS}
    total_power = Decimal(total_power)
    if total_power < 0 or any(value < 0 for value in power.values()):
        raise ValueError("voting power cannot be negative")
    quorum, veto_threshold = Decimal(quorum), Decimal(veto_threshold)
    threshold = Decimal(expedited_threshold if expedited else threshold)
    cast = sum(power.values(), Decimal(0))
    if cast > total_power:
        raise ValueError(f"votes cast ({cast}) exceed the total voting power ({total_power})")
    non_abstain = cast - power["abstain"]

    figures = dict(
        power=power,
        total_power=total_power,
        cast=cast,
        turnout=_ratio(cast, total_power) if total_power else Decimal(0),
        quorum=quorum,
        threshold=threshold,
        veto_threshold=veto_threshold,
        yes_ratio=_ratio(power["yes"], non_abstain) if non_abstain else None,
        veto_ratio=_ratio(power["no_with_veto"], cast) if cast else None,
        expedited=expedited,
    )
    quorum_reached = total_power > 0 and cast >= quorum * total_power
    veto_reached = cast > 0 and power["no_with_veto"] > veto_threshold * cast
    threshold_reached = non_abstain > 0 and power["yes"] > threshold * non_abstain
    figures.update(quorum_reached=quorum_reached, veto_reached=veto_reached, threshold_reached=threshold_reached)

    if not quorum_reached:
        return TallyResult(status="failed", reason="quorum not reached", **figures)
    if non_abstain == 0:
        return TallyResult(status="failed", reason="every vote cast was Abstain", **figures)
    if veto_reached:
        return TallyResult(status="vetoed", reason="NoWithVeto above the veto threshold", **figures)
    if threshold_reached:
        return TallyResult(status="passed", reason="Yes above the threshold", **figures)
    return TallyResult(status="rejected", reason="Yes not above the threshold", **figures)
