import hashlib
import secrets
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone

from .wallet import generate_wallet_address, validate_wallet_address


class User(AbstractUser):
    """A member of the R3MES community: a wallet address and a stake that gives voting power."""

    wallet_address = models.CharField(
        max_length=44,
        unique=True,
        default=generate_wallet_address,
        validators=[validate_wallet_address],
        help_text="remes1 followed by 38 lowercase letters or digits",
    )
    stake = models.DecimalField(
        max_digits=30, decimal_places=6, default=Decimal("0"), validators=[MinValueValidator(Decimal("0"))]
    )

    class Meta:
        ordering = ["username"]

    def __str__(self):
        return self.username

    def locked_deposits(self):
        total = self.deposits.filter(status=Deposit.Status.LOCKED).aggregate(total=models.Sum("amount"))["total"]
        return total or Decimal(0)

    def available_stake(self):
        """Stake not already locked in open proposals' deposits: what the user may still deposit."""
        return max(self.stake - self.locked_deposits(), Decimal(0))


class ApiToken(models.Model):
    """A bearer token for the JSON API. Only its SHA-256 is stored; the token is shown once."""

    PREFIX = "r3m_"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    hint = models.CharField(max_length=12, editable=False, help_text="First characters, to recognise it")
    created = models.DateTimeField(default=timezone.now)
    last_used = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created"]

    def __str__(self):
        return f"{self.name} ({self.hint}…)"

    @staticmethod
    def hash_key(raw):
        return hashlib.sha256(raw.encode()).hexdigest()

    @classmethod
    def issue(cls, user, name):
        """Creates a token and returns (token, raw_key); the raw key is never stored."""
        raw = cls.PREFIX + secrets.token_urlsafe(32)
        token = cls.objects.create(user=user, name=name, key_hash=cls.hash_key(raw), hint=raw[:10])
        return token, raw

    @classmethod
    def authenticate(cls, raw):
        if not raw.startswith(cls.PREFIX) or len(raw) > 200:
            return None
        token = (
            cls.objects.select_related("user")
            .filter(key_hash=cls.hash_key(raw), revoked_at__isnull=True, user__is_active=True)
            .first()
        )
        if token is None:
            return None
        now = timezone.now()
        # Record use at most once a minute: a busy client must not turn every call into a write.
        if token.last_used is None or now - token.last_used > timedelta(minutes=1):
            cls.objects.filter(pk=token.pk).update(last_used=now)
            token.last_used = now
        return token

    @property
    def is_active(self):
        return self.revoked_at is None

    def revoke(self):
        if self.revoked_at is None:
            self.revoked_at = timezone.now()
            self.save(update_fields=["revoked_at"])


class Refused(Exception):
    """A governance rule refused a request. Nothing was changed.

    `status` is the HTTP status the API answers with, `code` a stable machine-readable reason and
    `param` the request field at fault, if any."""

    def __init__(self, message, *, code, status=400, param=None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.param = param


class StakeChange(models.Model):
    """Audit trail of every change to a user's stake (staff edits, burned deposits)."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="stake_changes")
    old_stake = models.DecimalField(max_digits=30, decimal_places=6)
    new_stake = models.DecimalField(max_digits=30, decimal_places=6)
    changed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    reason = models.CharField(max_length=200)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created", "-id"]

    def __str__(self):
        return f"{self.user}: {self.old_stake} → {self.new_stake} ({self.reason})"

    @classmethod
    def apply(cls, user, new_stake, *, reason, changed_by=None):
        """Sets the user's stake and records the change (inside the caller's transaction)."""
        old = User.objects.select_for_update().values_list("stake", flat=True).get(pk=user.pk)
        if old == new_stake:
            return None
        User.objects.filter(pk=user.pk).update(stake=new_stake)
        user.stake = new_stake
        return cls.objects.create(user=user, old_stake=old, new_stake=new_stake, changed_by=changed_by, reason=reason)

    @classmethod
    def deduct(cls, user, amount, *, reason):
        """Takes `amount` from the stake as stored now (never below zero) and records it."""
        current = User.objects.select_for_update().values_list("stake", flat=True).get(pk=user.pk)
        return cls.apply(user, max(current - amount, Decimal(0)), reason=reason)


VOTE_OPTIONS = ("yes", "no", "abstain", "no_with_veto")
OPTION_LABELS = {"yes": "Yes", "no": "No", "abstain": "Abstain", "no_with_veto": "No with veto"}
# Cosmos weighted votes carry 18 decimal places.
WEIGHT_PLACES = 18


def parse_vote_options(option=None, weighted=None):
    """The vote as {option: weight} with weights summing to exactly 1, or Refused.

    Either a single option ("yes", "no", "abstain", "no_with_veto") or a weighted split such as
    {"yes": "0.7", "no": "0.3"} (Cosmos MsgVoteWeighted: positive weights, known options, sum 1)."""
    if (option is None) == (weighted is None):
        raise Refused("Send either 'option' or 'weighted', not both and not neither", code="invalid_vote",
                      param="option")
    if option is not None:
        if option not in VOTE_OPTIONS:
            raise Refused(f"Unknown vote option {option!r}; use one of {', '.join(VOTE_OPTIONS)}",
                          code="unknown_option", param="option")
        return {option: Decimal(1)}
    if not isinstance(weighted, dict) or not weighted:
        raise Refused("'weighted' must be a non-empty object mapping options to weights", code="invalid_weights",
                      param="weighted")
    weights = {}
    for name, raw in weighted.items():
        if name not in VOTE_OPTIONS:
            raise Refused(f"Unknown vote option {name!r}; use one of {', '.join(VOTE_OPTIONS)}",
                          code="unknown_option", param="weighted")
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            raise Refused(f"Weight for {name!r} must be a number", code="invalid_weights", param="weighted")
        try:
            # str() first so a JSON float such as 0.1 means 0.1, not its binary approximation.
            weight = Decimal(str(raw))
        except ArithmeticError:
            raise Refused(f"Weight for {name!r} is not a number: {raw!r}", code="invalid_weights",
                          param="weighted") from None
        if not weight.is_finite() or weight <= 0 or weight > 1:
            raise Refused(f"Weight for {name!r} must be above 0 and at most 1, got {raw}", code="invalid_weights",
                          param="weighted")
        if -weight.as_tuple().exponent > WEIGHT_PLACES:
            raise Refused(f"Weight for {name!r} has more than {WEIGHT_PLACES} decimal places", code="invalid_weights",
                          param="weighted")
        weights[name] = weight
    total = sum(weights.values(), Decimal(0))
    if total != 1:
        raise Refused(f"Weights must sum to exactly 1, they sum to {total}", code="weights_sum", param="weighted")
    return weights


class Proposal(models.Model):
    """A proposal to trust an adapter version, a training dataset or a backbone version.

    Cosmos x/gov life cycle: deposit period (until the minimum deposit is reached) → voting period
    (power snapshotted at its start) → tally → passed (executed) / rejected / vetoed / failed.
    The rules live here; work that touches the targets lives in governance/actions.py."""

    class Kind(models.TextChoices):
        ADAPTER = "adapter"
        DATASET = "dataset"
        BACKBONE = "backbone"

    class Status(models.TextChoices):
        DEPOSIT = "deposit", "Deposit period"
        VOTING = "voting", "Voting"
        PASSED = "passed", "Passed"
        REJECTED = "rejected", "Rejected"
        VETOED = "vetoed", "Vetoed"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    OPEN = (Status.DEPOSIT, Status.VOTING)

    kind = models.CharField(max_length=10, choices=Kind.choices)
    target_id = models.PositiveBigIntegerField(help_text="Primary key of the adapter, dataset or model version")
    target_label = models.CharField(max_length=200, blank=True, help_text="The target's name when proposed")
    title = models.CharField(max_length=200)
    description = models.TextField(blank=True, help_text="Markdown")
    proposer = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="proposals")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.DEPOSIT, db_index=True)
    expedited = models.BooleanField(
        default=False, help_text="Tallied under expedited rules; cleared when an expedited vote fails"
    )
    total_deposit = models.DecimalField(max_digits=30, decimal_places=6, default=Decimal(0))
    submit_time = models.DateTimeField(default=timezone.now)
    deposit_end = models.DateTimeField()
    voting_start = models.DateTimeField(null=True, blank=True)
    voting_end = models.DateTimeField(null=True, blank=True, db_index=True)
    total_power = models.DecimalField(
        max_digits=30, decimal_places=6, null=True, blank=True, help_text="Sum of stakes snapshotted when voting opened"
    )
    expedited_tally = models.JSONField(null=True, blank=True, help_text="The failed expedited tally, if converted")
    final_tally = models.JSONField(null=True, blank=True)
    closed_at = models.DateTimeField(null=True, blank=True)
    outcome_note = models.CharField(max_length=300, blank=True)

    class Meta:
        ordering = ["-submit_time", "-id"]
        constraints = [
            # Two open proposals on one target would race to execute it.
            models.UniqueConstraint(
                fields=["kind", "target_id"],
                condition=models.Q(status__in=["deposit", "voting"]),
                name="one_open_proposal_per_target",
            ),
            models.CheckConstraint(condition=models.Q(total_deposit__gte=0), name="proposal_deposit_not_negative"),
        ]

    def __str__(self):
        return f"#{self.pk} {self.title}"

    @property
    def is_open(self):
        return self.status in self.OPEN

    @property
    def min_deposit(self):
        return settings.R3MES_GOV_EXPEDITED_MIN_DEPOSIT if self.expedited else settings.R3MES_GOV_MIN_DEPOSIT

    @property
    def threshold(self):
        return settings.R3MES_GOV_EXPEDITED_THRESHOLD if self.expedited else settings.R3MES_GOV_THRESHOLD

    @property
    def period_end(self):
        """When the current period ends (None once closed)."""
        if self.status == self.Status.DEPOSIT:
            return self.deposit_end
        if self.status == self.Status.VOTING:
            return self.voting_end
        return None

    # --- deposit period ---------------------------------------------------------------------

    def deposit(self, user, amount, now=None):
        """Locks `amount` of the user's stake as a deposit; opens voting once the minimum is reached.
        The caller holds the proposal and user rows (governance.actions.do_deposit)."""
        now = now or timezone.now()
        if self.status not in self.OPEN:
            raise Refused(f"Proposal #{self.pk} is {self.status}; deposits are closed", code="not_open", status=409)
        if self.status == self.Status.DEPOSIT and now >= self.deposit_end:
            raise Refused(f"The deposit period of proposal #{self.pk} has ended", code="deposit_period_over",
                          status=409)
        if self.status == self.Status.VOTING and now >= self.voting_end:
            raise Refused(f"The voting period of proposal #{self.pk} has ended", code="voting_period_over", status=409)
        if not isinstance(amount, Decimal) or not amount.is_finite() or amount <= 0:
            raise Refused("The deposit amount must be a positive number", code="invalid_amount", param="amount")
        if -amount.as_tuple().exponent > 6:
            raise Refused("The deposit amount has more than 6 decimal places", code="invalid_amount", param="amount")
        available = user.available_stake()
        if amount > available:
            raise Refused(
                f"Deposit of {amount} exceeds your available stake of {available} "
                f"(stake {user.stake}, of which {user.locked_deposits()} is locked in open deposits)",
                code="insufficient_stake", param="amount",
            )
        deposit = Deposit.objects.create(proposal=self, depositor=user, amount=amount, created=now)
        self.total_deposit += amount
        self.save(update_fields=["total_deposit"])
        if self.status == self.Status.DEPOSIT and self.total_deposit >= self.min_deposit:
            self.open_voting(now)
        return deposit

    def open_voting(self, now=None):
        """Starts the voting period and snapshots every member's stake as their voting power."""
        now = now or timezone.now()
        period = (
            settings.R3MES_GOV_EXPEDITED_VOTING_PERIOD if self.expedited else settings.R3MES_GOV_VOTING_PERIOD
        )
        stakes = list(User.objects.filter(is_active=True, stake__gt=0).values_list("pk", "stake"))
        StakeSnapshot.objects.bulk_create(StakeSnapshot(proposal=self, user_id=pk, power=stake) for pk, stake in stakes)
        self.status = self.Status.VOTING
        self.voting_start = now
        self.voting_end = now + timedelta(seconds=period)
        self.total_power = sum((stake for _, stake in stakes), Decimal(0))
        self.save(update_fields=["status", "voting_start", "voting_end", "total_power"])

    def cancel(self, user, now=None):
        """The proposer withdraws during the deposit period; part of the deposits is burned (Cosmos)."""
        now = now or timezone.now()
        if user.pk != self.proposer_id:
            raise Refused("Only the proposer may cancel a proposal", code="not_proposer", status=403)
        claimed = Proposal.objects.filter(pk=self.pk, status=self.Status.DEPOSIT).update(
            status=self.Status.CANCELLED, closed_at=now, outcome_note="cancelled by the proposer"
        )
        if not claimed:
            raise Refused(f"Proposal #{self.pk} can only be cancelled during its deposit period",
                          code="not_in_deposit_period", status=409)
        self.refresh_from_db()
        self.settle_deposits(burn_ratio=settings.R3MES_GOV_PROPOSAL_CANCEL_RATIO, now=now)

    def expire(self, now=None, *, force=False):
        """Ends a deposit period that did not reach the minimum deposit; False if not due or taken.
        `force` ends it before its time (the admin's "close now")."""
        now = now or timezone.now()
        claimable = Proposal.objects.filter(pk=self.pk, status=self.Status.DEPOSIT)
        if not force:
            claimable = claimable.filter(deposit_end__lte=now)
        claimed = claimable.update(
            status=self.Status.CANCELLED, closed_at=now,
            outcome_note="the deposit period ended without the minimum deposit",
        )
        if not claimed:
            return False
        self.refresh_from_db()
        burn = settings.R3MES_GOV_BURN_PROPOSAL_DEPOSIT_PREVOTE
        self.settle_deposits(burn_ratio=Decimal(1) if burn else Decimal(0), now=now)
        return True

    def settle_deposits(self, *, burn_ratio, now):
        """Unlocks every deposit: refunded, or `burn_ratio` of it burned (taken from the stake)."""
        for deposit in self.deposits.filter(status=Deposit.Status.LOCKED).select_related("depositor"):
            burned = (deposit.amount * burn_ratio).quantize(Decimal("0.000001"))
            deposit.burned = burned
            deposit.status = Deposit.Status.BURNED if burned else Deposit.Status.REFUNDED
            deposit.settled_at = now
            deposit.save(update_fields=["burned", "status", "settled_at"])
            if burned:
                StakeChange.deduct(deposit.depositor, burned, reason=f"deposit burned: proposal #{self.pk} {self.status}")

    # --- voting period ----------------------------------------------------------------------

    def voting_power_of(self, user):
        if not user.is_authenticated:
            return Decimal(0)
        snapshot = self.snapshots.filter(user=user).values_list("power", flat=True).first()
        return snapshot or Decimal(0)

    def cast_vote(self, user, weights, now=None):
        """Records or replaces the user's vote (weights from parse_vote_options). The caller holds
        the proposal row, so concurrent submissions by one voter end as one vote."""
        now = now or timezone.now()
        if self.status != self.Status.VOTING:
            raise Refused(f"Proposal #{self.pk} is not in its voting period (status: {self.status})",
                          code="not_in_voting_period", status=409)
        if now >= self.voting_end:
            raise Refused(f"Proposal #{self.pk} is not in its voting period: voting ended at "
                          f"{self.voting_end:%Y-%m-%d %H:%M:%S} UTC", code="not_in_voting_period", status=409)
        power = self.voting_power_of(user)
        if power <= 0:
            raise Refused("You had no stake when voting opened, so you have no voting power on this proposal",
                          code="no_voting_power", status=403)
        vote, created = Vote.objects.update_or_create(
            proposal=self, voter=user,
            defaults={"options": {name: str(weight) for name, weight in weights.items()}, "power": power,
                      "changed_at": now},
            create_defaults={"options": {name: str(weight) for name, weight in weights.items()}, "power": power,
                             "created": now, "changed_at": now},
        )
        VoteChange.objects.create(proposal=self, voter=user, options=vote.options, power=power, at=now,
                                  first=created)
        return vote

    def power_by_option(self):
        totals = {option: Decimal(0) for option in VOTE_OPTIONS}
        for options, power in self.votes.values_list("options", "power"):
            for option, weight in options.items():
                totals[option] += power * Decimal(weight)
        return totals

    def tally(self):
        """The tally of the votes so far under the current rules (final once closed)."""
        from .tally import tally_votes

        return tally_votes(
            self.power_by_option(), self.total_power or Decimal(0), self.expedited,
            quorum=settings.R3MES_GOV_QUORUM, threshold=settings.R3MES_GOV_THRESHOLD,
            veto_threshold=settings.R3MES_GOV_VETO_THRESHOLD,
            expedited_threshold=settings.R3MES_GOV_EXPEDITED_THRESHOLD,
        )

    def close(self, now=None, *, force=False):
        """Ends the voting period: tallies, claims the proposal with a conditional UPDATE (so two
        beat or worker processes close it once) and settles the deposits.

        Returns (outcome, tally): outcome is the new status, "converted" when a failed expedited
        vote became a regular one (Cosmos v0.50: votes kept, the period runs to the regular end),
        or None when the proposal is not due or another process closed it first. `force` closes
        before the period ends (the admin's "close now"). Executing a passed target is the
        caller's (governance.actions.do_close_proposal)."""
        now = now or timezone.now()
        claimable = Proposal.objects.filter(pk=self.pk, status=self.Status.VOTING)
        if not force:
            claimable = claimable.filter(voting_end__lte=now)
        result = self.tally()
        if self.expedited and not result.passed:
            end = self.voting_start + timedelta(seconds=settings.R3MES_GOV_VOTING_PERIOD)
            if force:
                end = min(end, now)
            if not claimable.filter(expedited=True).update(expedited=False, voting_end=end,
                                                           expedited_tally=result.as_dict()):
                return None, result
            self.refresh_from_db()
            return "converted", result
        if not claimable.update(status=result.status, final_tally=result.as_dict(), closed_at=now,
                                outcome_note=result.reason, **({"voting_end": now} if force else {})):
            return None, result
        self.refresh_from_db()
        if result.status == self.Status.VETOED:
            burn = settings.R3MES_GOV_BURN_VOTE_VETO
        elif result.status == self.Status.FAILED and not result.quorum_reached:
            burn = settings.R3MES_GOV_BURN_VOTE_QUORUM
        else:
            burn = False
        self.settle_deposits(burn_ratio=Decimal(1) if burn else Decimal(0), now=now)
        return result.status, result

    def mark_failed(self, note):
        """A passed proposal whose execution failed (Cosmos: PROPOSAL_STATUS_FAILED)."""
        Proposal.objects.filter(pk=self.pk).update(status=self.Status.FAILED, outcome_note=note[:300])
        self.status = self.Status.FAILED
        self.outcome_note = note[:300]


class Deposit(models.Model):
    class Status(models.TextChoices):
        LOCKED = "locked"
        REFUNDED = "refunded"
        BURNED = "burned"

    proposal = models.ForeignKey(Proposal, on_delete=models.CASCADE, related_name="deposits")
    depositor = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="deposits")
    amount = models.DecimalField(max_digits=30, decimal_places=6)
    burned = models.DecimalField(max_digits=30, decimal_places=6, default=Decimal(0))
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.LOCKED, db_index=True)
    created = models.DateTimeField(default=timezone.now)
    settled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created", "id"]
        constraints = [models.CheckConstraint(condition=models.Q(amount__gt=0), name="deposit_amount_positive")]

    def __str__(self):
        return f"{self.depositor} deposited {self.amount} on #{self.proposal_id}"


class Vote(models.Model):
    """One voter's vote on a proposal: {option: weight} summing to 1, with the snapshotted power."""

    proposal = models.ForeignKey(Proposal, on_delete=models.CASCADE, related_name="votes")
    voter = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="votes")
    options = models.JSONField(help_text='e.g. {"yes": "1"} or {"yes": "0.7", "no": "0.3"}')
    power = models.DecimalField(max_digits=30, decimal_places=6)
    created = models.DateTimeField(default=timezone.now)
    changed_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-changed_at", "-id"]
        constraints = [models.UniqueConstraint(fields=["proposal", "voter"], name="one_vote_per_voter")]

    def __str__(self):
        return f"{self.voter} on #{self.proposal_id}: {self.summary}"

    @property
    def summary(self):
        if len(self.options) == 1:
            return OPTION_LABELS[next(iter(self.options))]
        return ", ".join(f"{OPTION_LABELS[o]} {Decimal(w):%}" for o, w in self.options.items())

    @property
    def changed(self):
        return self.changed_at != self.created


class VoteChange(models.Model):
    """Every vote submission in order: the history behind each voter's current Vote."""

    proposal = models.ForeignKey(Proposal, on_delete=models.CASCADE, related_name="vote_history")
    voter = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    options = models.JSONField()
    power = models.DecimalField(max_digits=30, decimal_places=6)
    first = models.BooleanField(default=True, help_text="False when it replaced an earlier vote")
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-at", "-id"]

    @property
    def summary(self):
        return Vote.summary.fget(self)


class StakeSnapshot(models.Model):
    """A member's stake when a proposal's voting opened: their voting power on it."""

    proposal = models.ForeignKey(Proposal, on_delete=models.CASCADE, related_name="snapshots")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    power = models.DecimalField(max_digits=30, decimal_places=6)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["proposal", "user"], name="one_snapshot_per_user")]
