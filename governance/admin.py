from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin
from django.db import transaction

from .actions import do_close_proposal
from .models import ApiToken, Deposit, Proposal, StakeChange, User, Vote


class StakeChangeInline(admin.TabularInline):
    model = StakeChange
    fk_name = "user"
    fields = ("created", "old_stake", "new_stake", "changed_by", "reason")
    readonly_fields = fields
    extra = 0
    can_delete = False
    max_num = 0
    verbose_name_plural = "Stake changes (audit trail)"


@admin.register(User)
class UserAdmin(BaseUserAdmin):
    list_display = ("username", "email", "wallet_address", "stake", "is_staff", "is_active", "date_joined")
    list_filter = ("is_staff", "is_superuser", "is_active")
    search_fields = ("username", "email", "wallet_address")
    fieldsets = BaseUserAdmin.fieldsets + (("R3MES", {"fields": ("wallet_address", "stake")}),)
    add_fieldsets = BaseUserAdmin.add_fieldsets + (("R3MES", {"fields": ("wallet_address", "stake")}),)
    inlines = [StakeChangeInline]

    def save_model(self, request, obj, form, change):
        # Every stake edit by staff leaves an audit row (who, from, to): stake is voting power.
        with transaction.atomic():
            if change and "stake" in form.changed_data:
                new_stake = obj.stake
                obj.stake = User.objects.get(pk=obj.pk).stake
                super().save_model(request, obj, form, change)
                StakeChange.apply(obj, new_stake, reason="edited in the admin", changed_by=request.user)
            else:
                super().save_model(request, obj, form, change)
                if not change and obj.stake:
                    StakeChange.objects.create(user=obj, old_stake=0, new_stake=obj.stake, changed_by=request.user,
                                               reason="set when created in the admin")


@admin.register(StakeChange)
class StakeChangeAdmin(admin.ModelAdmin):
    list_display = ("created", "user", "old_stake", "new_stake", "changed_by", "reason")
    list_filter = ("created",)
    search_fields = ("user__username", "changed_by__username", "reason")

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("name", "user", "hint", "created", "last_used", "revoked_at")
    list_filter = ("revoked_at", "created")
    search_fields = ("name", "user__username", "hint")
    readonly_fields = ("key_hash", "hint", "created", "last_used")
    actions = ["revoke"]

    @admin.action(description="Revoke selected tokens")
    def revoke(self, request, queryset):
        for token in queryset:
            token.revoke()


class DepositInline(admin.TabularInline):
    model = Deposit
    fields = ("depositor", "amount", "status", "burned", "created", "settled_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    max_num = 0


class VoteInline(admin.TabularInline):
    model = Vote
    fields = ("voter", "options", "power", "created", "changed_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    max_num = 0


@admin.register(Proposal)
class ProposalAdmin(admin.ModelAdmin):
    list_display = ("id", "title", "kind", "target_label", "status", "expedited", "total_deposit", "voting_end",
                    "proposer")
    list_filter = ("status", "kind", "expedited")
    search_fields = ("title", "description", "target_label", "proposer__username")
    # Outcomes come from deposits, votes and the tally, never from hand edits.
    readonly_fields = ("kind", "target_id", "target_label", "proposer", "status", "expedited", "total_deposit",
                       "submit_time", "deposit_end", "voting_start", "voting_end", "total_power", "expedited_tally",
                       "final_tally", "closed_at", "outcome_note")
    fields = ("title", "description") + readonly_fields
    inlines = [DepositInline, VoteInline]
    actions = ["close_now"]

    def has_add_permission(self, request):
        return False  # proposals are made on the site or through the API, with their checks

    @admin.action(description="Close now (tally a voting period, end a deposit period)")
    def close_now(self, request, queryset):
        for proposal in queryset:
            if not proposal.is_open:
                self.message_user(request, f"#{proposal.pk} is already {proposal.status}", messages.WARNING)
                continue
            outcome = do_close_proposal(proposal.pk, force=True)
            self.message_user(request, f"#{proposal.pk}: {outcome or 'nothing to do'}")
