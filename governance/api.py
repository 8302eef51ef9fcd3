"""Bearer-token JSON API for governance: /api/governance/proposals[...]. Errors in the OpenAI shape."""

from django.http import JsonResponse

from r3mes_site.api import ApiError, api_token_required, api_view, parse_json, rate_limited

from .actions import access_proposal, do_create_proposal, do_deposit, do_vote
from .models import Proposal, Refused, parse_vote_options
from .targets import TARGETS, get_target

LIST_LIMIT = 100


def _iso(value):
    return value.isoformat() if value else None


def proposal_json(proposal, *, with_votes=True):
    tally = proposal.final_tally or (proposal.tally().as_dict() if proposal.status == Proposal.Status.VOTING else None)
    body = {
        "id": proposal.pk,
        "kind": proposal.kind,
        "target": {"id": proposal.target_id, "label": proposal.target_label},
        "title": proposal.title,
        "description": proposal.description,
        "proposer": proposal.proposer.username,
        "status": proposal.status,
        "expedited": proposal.expedited,
        "converted_from_expedited": proposal.expedited_tally is not None,
        "total_deposit": str(proposal.total_deposit),
        "min_deposit": str(proposal.min_deposit),
        "submit_time": _iso(proposal.submit_time),
        "deposit_end": _iso(proposal.deposit_end),
        "voting_start": _iso(proposal.voting_start),
        "voting_end": _iso(proposal.voting_end),
        "closed_at": _iso(proposal.closed_at),
        "total_power": None if proposal.total_power is None else str(proposal.total_power),
        "tally": tally,
        "outcome_note": proposal.outcome_note,
    }
    if with_votes:
        target = get_target(proposal.kind, proposal.target_id)
        body["target"]["status"] = target.status if target else None
        body["target"]["facts"] = {k: str(v) for k, v in TARGETS[proposal.kind].facts(target)} if target else None
        body["expedited_tally"] = proposal.expedited_tally
        body["votes"] = [
            {"voter": v.voter.username, "options": v.options, "power": str(v.power), "changed_at": _iso(v.changed_at)}
            for v in proposal.votes.select_related("voter")
        ]
        body["deposits"] = [
            {"depositor": d.depositor.username, "amount": str(d.amount), "status": d.status, "burned": str(d.burned),
             "created": _iso(d.created)}
            for d in proposal.deposits.select_related("depositor")
        ]
    return body


def _refused(exc):
    return ApiError(exc.status, exc.message, param=exc.param, code=exc.code)


@api_view(["GET", "POST"])
@api_token_required
@rate_limited("governance", "R3MES_RATE_API")
def proposals(request):
    if request.method == "POST":
        return _create(request)
    status = request.GET.get("status", "")
    listed = Proposal.objects.select_related("proposer")
    if status == "open":
        listed = listed.filter(status__in=Proposal.OPEN)
    elif status:
        if status not in Proposal.Status.values:
            raise ApiError(400, f"Unknown status {status!r}; use open or one of {', '.join(Proposal.Status.values)}",
                           param="status", code="unknown_status")
        listed = listed.filter(status=status)
    kind = request.GET.get("kind", "")
    if kind:
        if kind not in TARGETS:
            raise ApiError(400, f"Unknown kind {kind!r}; use one of {', '.join(TARGETS)}", param="kind",
                           code="unknown_kind")
        listed = listed.filter(kind=kind)
    try:
        limit = int(request.GET.get("limit", 50))
        offset = int(request.GET.get("offset", 0))
    except ValueError:
        raise ApiError(400, "limit and offset must be integers", param="limit", code="invalid_paging") from None
    if not 1 <= limit <= LIST_LIMIT or offset < 0:
        raise ApiError(400, f"limit must be 1..{LIST_LIMIT} and offset >= 0", param="limit", code="invalid_paging")
    page = listed[offset:offset + limit]
    return JsonResponse({"object": "list", "data": [proposal_json(p, with_votes=False) for p in page],
                         "total": listed.count(), "limit": limit, "offset": offset})


def _create(request):
    body = parse_json(request)
    unknown = set(body) - {"kind", "target", "title", "description", "expedited", "deposit"}
    if unknown:
        raise ApiError(400, f"Unknown fields: {', '.join(sorted(unknown))}", param=sorted(unknown)[0],
                       code="unknown_field")
    try:
        proposal = do_create_proposal(
            request.user, kind=body.get("kind"), target=body.get("target"), title=body.get("title"),
            description=body.get("description", ""), expedited=body.get("expedited", False),
            deposit=body.get("deposit"),
        )
    except Refused as exc:
        raise _refused(exc) from None
    return JsonResponse(proposal_json(proposal), status=201)


@api_view(["GET"])
@api_token_required
@rate_limited("governance", "R3MES_RATE_API")
def proposal_detail(request, proposal_id):
    try:
        proposal = access_proposal(proposal_id)
    except Refused as exc:
        raise _refused(exc) from None
    return JsonResponse(proposal_json(proposal))


@api_view(["POST"])
@api_token_required
@rate_limited("governance", "R3MES_RATE_API")
def deposit(request, proposal_id):
    body = parse_json(request)
    if "amount" not in body:
        raise ApiError(400, "Send {\"amount\": <number>}", param="amount", code="missing_amount")
    try:
        made = do_deposit(proposal_id, request.user, body["amount"])
    except Refused as exc:
        raise _refused(exc) from None
    response = proposal_json(access_proposal(proposal_id))
    response["deposit"] = {"amount": str(made.amount), "status": made.status}
    return JsonResponse(response)


@api_view(["POST"])
@api_token_required
@rate_limited("governance", "R3MES_RATE_API")
def vote(request, proposal_id):
    body = parse_json(request)
    unknown = set(body) - {"option", "weighted"}
    if unknown:
        raise ApiError(400, f"Unknown fields: {', '.join(sorted(unknown))}", param=sorted(unknown)[0],
                       code="unknown_field")
    try:
        weights = parse_vote_options(body.get("option"), body.get("weighted"))
        cast = do_vote(proposal_id, request.user, weights)
    except Refused as exc:
        raise _refused(exc) from None
    response = proposal_json(access_proposal(proposal_id))
    response["vote"] = {"options": cast.options, "power": str(cast.power), "changed_at": _iso(cast.changed_at)}
    return JsonResponse(response)
