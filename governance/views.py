from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.views import redirect_to_login
from django.db.models import Q
from django.http import Http404, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from r3mes_site.api import api_token_required, api_view

from .actions import access_proposal, do_cancel_proposal, do_create_proposal, do_deposit, do_vote
from .forms import ApiTokenForm, DepositForm, ProposalForm, SignupForm, VoteForm
from .models import OPTION_LABELS, ApiToken, Proposal, Refused, Vote
from .targets import TARGETS, dataset_preview, get_target


def signup(request):
    if request.user.is_authenticated:
        return redirect("profile")
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        messages.success(request, f"Welcome to R3MES, {user.username}. Your wallet is {user.wallet_address}.")
        return redirect("profile")
    return render(request, "registration/signup.html", {"form": form})


@login_required
def profile(request):
    form = ApiTokenForm(user=request.user)
    new_token = None
    if request.method == "POST":
        form = ApiTokenForm(request.POST, user=request.user)
        if form.is_valid():
            token, new_token = ApiToken.issue(request.user, form.cleaned_data["name"])
            messages.success(request, f"Token “{token.name}” created. Copy it now: it will not be shown again.")
            form = ApiTokenForm(user=request.user)
    tokens = request.user.api_tokens.all()
    return render(request, "governance/profile.html", {"form": form, "tokens": tokens, "new_token": new_token})


@login_required
@require_POST
def revoke_token(request, token_id):
    token = get_object_or_404(ApiToken, pk=token_id, user=request.user)
    token.revoke()
    messages.info(request, f"Token “{token.name}” revoked.")
    return redirect("profile")


@api_view(["GET"])
@api_token_required
def api_me(request):
    user = request.user
    return JsonResponse(
        {
            "username": user.username,
            "wallet_address": user.wallet_address,
            "stake": str(user.stake),
            "is_staff": user.is_staff,
            "token": {"name": request.api_token.name, "hint": request.api_token.hint},
        }
    )


# --- Governance pages ----------------------------------------------------------------------------

LIST_FILTERS = {
    "all": ("All", lambda request: Q()),
    "open": ("Open", lambda request: Q(status__in=Proposal.OPEN)),
    "passed": ("Passed", lambda request: Q(status=Proposal.Status.PASSED)),
    "rejected": (
        "Rejected",
        lambda request: Q(status__in=[Proposal.Status.REJECTED, Proposal.Status.VETOED, Proposal.Status.FAILED]),
    ),
    "mine": ("Mine", lambda request: Q(proposer=request.user) if request.user.is_authenticated else Q(pk__in=[])),
}


def gov_rules():
    return {
        "min_deposit": settings.R3MES_GOV_MIN_DEPOSIT,
        "expedited_min_deposit": settings.R3MES_GOV_EXPEDITED_MIN_DEPOSIT,
        "deposit_period": settings.R3MES_GOV_DEPOSIT_PERIOD,
        "voting_period": settings.R3MES_GOV_VOTING_PERIOD,
        "expedited_voting_period": settings.R3MES_GOV_EXPEDITED_VOTING_PERIOD,
        "quorum": settings.R3MES_GOV_QUORUM,
        "threshold": settings.R3MES_GOV_THRESHOLD,
        "veto_threshold": settings.R3MES_GOV_VETO_THRESHOLD,
    }


def _proposal_or_404(proposal_id):
    try:
        return access_proposal(proposal_id)
    except Refused:
        raise Http404("No such proposal") from None


def proposal_list(request):
    current = request.GET.get("filter", "all")
    if current not in LIST_FILTERS:
        current = "all"
    query = request.GET.get("q", "").strip()[:100]
    proposals = Proposal.objects.select_related("proposer").filter(LIST_FILTERS[current][1](request))
    if query:
        search = Q(title__icontains=query) | Q(description__icontains=query) | Q(target_label__icontains=query)
        if query.lstrip("#").isdigit():
            search |= Q(pk=int(query.lstrip("#")))
        proposals = proposals.filter(search)
    context = {
        "proposals": proposals[:200],
        "filters": [(key, label) for key, (label, _) in LIST_FILTERS.items()],
        "current": current,
        "query": query,
        "rules": gov_rules(),
    }
    template = "governance/partials/proposal_rows.html" if request.htmx else "governance/proposal_list.html"
    return render(request, template, context)


@login_required
def proposal_create(request):
    initial = {"target": request.GET.get("target", "")}
    form = ProposalForm(request.POST or None, initial=initial)
    if request.method == "POST" and form.is_valid():
        kind, target_id = form.cleaned_data["target"]
        try:
            proposal = do_create_proposal(
                request.user, kind=kind, target=target_id, title=form.cleaned_data["title"],
                description=form.cleaned_data["description"], expedited=form.cleaned_data["expedited"],
                deposit=form.cleaned_data["deposit"] or None,
            )
        except Refused as exc:
            form.add_error(exc.param if exc.param in form.fields else None, exc.message)
        else:
            messages.success(request, f"Proposal #{proposal.pk} submitted.")
            return redirect("proposal", proposal.pk)
    has_candidates = len(form.fields["target"].choices) > 1
    return render(request, "governance/proposal_create.html",
                  {"form": form, "rules": gov_rules(), "has_candidates": has_candidates})


def _vote_context(request, proposal):
    """Whether this visitor may vote, and if not, why (shown instead of the form)."""
    user = request.user
    context = {"proposal": proposal, "my_vote": None, "can_vote": False, "why_not": ""}
    if user.is_authenticated:
        context["my_vote"] = proposal.votes.filter(voter=user).first()
    if proposal.status == Proposal.Status.DEPOSIT:
        context["why_not"] = f"Voting opens once deposits reach {proposal.min_deposit:f}."
    elif proposal.status != Proposal.Status.VOTING or proposal.voting_end <= timezone.now():
        context["why_not"] = "Voting is closed."
    elif not user.is_authenticated:
        context["why_not"] = "Log in to vote."
    else:
        context["power"] = proposal.voting_power_of(user)
        if context["power"] <= 0:
            context["why_not"] = (
                "You had no stake when voting opened, so you have no voting power on this proposal."
            )
        else:
            context["can_vote"] = True
    if context["can_vote"] and "form" not in context:
        initial = {}
        if context["my_vote"] and len(context["my_vote"].options) == 1:
            initial["option"] = next(iter(context["my_vote"].options))
        context["form"] = VoteForm(initial=initial)
    return context


def _deposit_context(request, proposal):
    user = request.user
    context = {"proposal": proposal, "can_deposit": False}
    if proposal.is_open and user.is_authenticated:
        context["available"] = user.available_stake()
        context["can_deposit"] = context["available"] > 0
        context["form"] = DepositForm()
    return context


def _live_context(proposal):
    tally = proposal.final_tally or (proposal.tally().as_dict() if proposal.status == Proposal.Status.VOTING else None)
    bars = []
    if tally:
        total = proposal.total_power or 0
        for option in ("yes", "no", "no_with_veto", "abstain"):
            power = tally["power"][option]
            share = (float(power) / float(total)) if total else 0
            bars.append({"option": option, "label": OPTION_LABELS[option], "power": power, "share": share})
    return {
        "proposal": proposal,
        "tally": tally,
        "bars": bars,
        "votes": proposal.votes.select_related("voter")[:200],
        "history": proposal.vote_history.select_related("voter")[:50],
        "deposits": proposal.deposits.select_related("depositor"),
        "now": timezone.now(),
    }


def proposal_detail(request, proposal_id):
    proposal = _proposal_or_404(proposal_id)
    target = get_target(proposal.kind, proposal.target_id)
    context = {
        "proposal": proposal,
        "target": target,
        "target_kind": TARGETS[proposal.kind],
        "target_facts": TARGETS[proposal.kind].facts(target) if target else [],
        "preview": dataset_preview(target) if target and proposal.kind == "dataset" else None,
        "vote": _vote_context(request, proposal),
        "deposit": _deposit_context(request, proposal),
        "live": _live_context(proposal),
        "can_cancel": request.user.is_authenticated and request.user.pk == proposal.proposer_id
        and proposal.status == Proposal.Status.DEPOSIT,
    }
    return render(request, "governance/proposal_detail.html", context)


def proposal_live(request, proposal_id):
    """The live part of the detail page (status, time left, tally bars, votes), polled by htmx."""
    proposal = _proposal_or_404(proposal_id)
    context = _live_context(proposal)
    if not proposal.is_open:
        # Once closed, refresh the vote and deposit panels out of band so their forms go away.
        context["closed_vote"] = _vote_context(request, proposal)
    return render(request, "governance/partials/live.html", context)


@require_POST
def proposal_vote(request, proposal_id):
    proposal = _proposal_or_404(proposal_id)
    if not request.user.is_authenticated:
        context = _vote_context(request, proposal)
        return render(request, "governance/partials/vote_panel.html", {"vote": context}, status=403)
    form = VoteForm(request.POST)
    status = 200
    if form.is_valid():
        try:
            do_vote(proposal.pk, request.user, form.cleaned_data["weights"])
        except Refused as exc:
            form.add_error(None, exc.message)
            status = exc.status
    else:
        status = 400
    proposal.refresh_from_db()
    context = _vote_context(request, proposal)
    if status != 200 and context["can_vote"]:
        context["form"] = form
    elif status != 200:
        context["error"] = form_error_text(form)
    else:
        context["saved"] = True
    response = render(request, "governance/partials/vote_panel.html", {"vote": context}, status=status)
    if status == 200:
        response["HX-Trigger"] = "tally-changed"
    return _htmx_or_redirect(request, response, proposal, form)


@require_POST
def proposal_deposit(request, proposal_id):
    proposal = _proposal_or_404(proposal_id)
    if not request.user.is_authenticated:
        return redirect_to_login(reverse("proposal", args=[proposal.pk]))
    was_voting = proposal.status == Proposal.Status.VOTING
    form = DepositForm(request.POST)
    status = 200
    if form.is_valid():
        try:
            do_deposit(proposal.pk, request.user, form.cleaned_data["amount"])
        except Refused as exc:
            form.add_error("amount", exc.message)
            status = exc.status
    else:
        status = 400
    proposal.refresh_from_db()
    request.user.refresh_from_db()
    context = _deposit_context(request, proposal)
    if status != 200:
        context["form"] = form
    else:
        context["saved"] = True
    response = render(request, "governance/partials/deposit_panel.html", {"deposit": context}, status=status)
    if status == 200 and not was_voting and proposal.status == Proposal.Status.VOTING:
        response["HX-Refresh"] = "true"  # voting just opened: the whole page changes
    elif status == 200:
        response["HX-Trigger"] = "tally-changed"
    return _htmx_or_redirect(request, response, proposal, form)


@login_required
@require_POST
def proposal_cancel(request, proposal_id):
    proposal = _proposal_or_404(proposal_id)
    try:
        do_cancel_proposal(proposal.pk, request.user)
    except Refused as exc:
        messages.error(request, exc.message)
    else:
        messages.info(request, f"Proposal #{proposal.pk} cancelled.")
    return redirect("proposal", proposal.pk)


def _htmx_or_redirect(request, response, proposal, form):
    """htmx gets the panel (governance.js swaps 4xx panels in place too); a plain form post
    without JavaScript goes back to the page with a message."""
    if request.htmx:
        return response
    if response.status_code == 200:
        messages.success(request, "Saved.")
    else:
        messages.error(request, form_error_text(form))
    return redirect("proposal", proposal.pk)


def form_error_text(form):
    return " ".join(message for errors in form.errors.values() for message in errors)


@login_required
def my_votes(request):
    votes = Vote.objects.filter(voter=request.user).select_related("proposal").order_by("-changed_at")
    deposits = request.user.deposits.select_related("proposal").order_by("-created")
    return render(request, "governance/my_votes.html", {"votes": votes, "deposits": deposits})
