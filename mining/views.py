import json

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import NoReverseMatch, reverse
from django.views.decorators.http import require_POST

from r3mes_site.api import ApiError, api_token_required, api_view, rate_limited

from . import actions
from .charts import loss_chart
from .datasets import DatasetInvalid
from .forms import DatasetUploadForm, RoundForm
from .models import Dataset, MinerScore, Round


def _links():
    links = []
    for label, name in (("Ledger", "mining-ledger"), ("Model versions", "mining-models")):
        try:
            links.append({"label": label, "url": reverse(name)})
        except NoReverseMatch:
            continue
    return links


def dashboard(request):
    return render(request, "mining/dashboard.html", {
        "rounds": Round.objects.select_related("dataset")[:10],
        "datasets": Dataset.objects.all()[:5],
        "scores": MinerScore.objects.all()[:5],
        "links": _links(),
        "counts": {s: Round.objects.filter(status=s).count() for s in Round.Status.values},
    })


# --- datasets ------------------------------------------------------------------------------------


def dataset_list(request):
    form = DatasetUploadForm()
    if request.method == "POST":
        if not request.user.is_authenticated:
            return redirect(f"{reverse('login')}?next={request.path}")
        form = DatasetUploadForm(request.POST, request.FILES)
        if form.is_valid():
            data = form.cleaned_data
            dataset = actions.do_upload_dataset(request.user, name=data["name"], expert=data["expert"],
                                                fmt=data["fmt"], data=data["data"], description=data["description"])
            messages.success(request, f"Dataset {dataset.name} uploaded with {dataset.examples} examples; "
                                      "a governance proposal makes it minable.")
            return redirect("mining-dataset", dataset.pk)
    return render(request, "mining/datasets.html", {"datasets": Dataset.objects.select_related("uploaded_by"),
                                                    "form": form})


def dataset_detail(request, pk):
    dataset = get_object_or_404(Dataset, pk=pk)
    from django.conf import settings

    from . import blobstore

    try:
        preview, error = dataset.preview(settings.MINING_PREVIEW_EXAMPLES), ""
    except (blobstore.BlobError, DatasetInvalid) as exc:
        preview, error = [], str(exc)
    return render(request, "mining/dataset_detail.html", {"dataset": dataset, "preview": preview, "error": error,
                                                          "rounds": dataset.rounds.all()})


# --- rounds --------------------------------------------------------------------------------------


def round_list(request):
    form = None
    can_open = request.user.is_authenticated
    if can_open:
        try:
            actions.check_can_open_round(request.user)
        except actions.Refused:
            can_open = False
    if can_open:
        form = RoundForm(request.POST or None, initial={"dataset": request.GET.get("dataset")})
        if request.method == "POST" and form.is_valid():
            try:
                round_obj = actions.do_open_round(request.user, form.cleaned_data["dataset"], **form.round_config())
                if form.cleaned_data["start_now"]:
                    actions.do_start_round(round_obj)
                messages.success(request, f"Round {round_obj.pk} opened.")
                return redirect("mining-round", round_obj.pk)
            except actions.Refused as exc:
                form.add_error(exc.param if exc.param in form.fields else None, exc.message)
    elif request.method == "POST":
        return render(request, "403.html", status=403)
    return render(request, "mining/rounds.html", {"rounds": Round.objects.select_related("dataset", "result"),
                                                  "form": form})


def _round_context(round_obj):
    submissions = list(round_obj.submissions.select_related("user").order_by("shard", "pk"))
    series = {f"{s.miner_name} · shard {s.shard}": s.train_losses for s in submissions if s.train_losses}
    for shard, losses in actions.live_losses(round_obj).items():
        series[f"{actions.local_miner_key()} · shard {shard} (training)"] = losses
    return {
        "round": round_obj,
        "submissions": submissions,
        "shards_done": len({s.shard for s in submissions}),
        "chart": loss_chart(series),
        "polling": round_obj.status in (Round.Status.OPEN, Round.Status.TRAINING, Round.Status.AGGREGATING),
    }


def round_detail(request, pk):
    round_obj = get_object_or_404(Round.objects.select_related("dataset", "result", "created_by"), pk=pk)
    context = _round_context(round_obj)
    context["can_start"] = (round_obj.status == Round.Status.OPEN and request.user.is_authenticated
                            and (request.user.is_staff or request.user == round_obj.created_by))
    return render(request, "mining/round_detail.html", context)


def round_progress(request, pk):
    round_obj = get_object_or_404(Round.objects.select_related("dataset", "result"), pk=pk)
    return render(request, "mining/_progress.html", _round_context(round_obj))


@login_required
@require_POST
def round_start(request, pk):
    round_obj = get_object_or_404(Round, pk=pk)
    if not (request.user.is_staff or request.user == round_obj.created_by):
        return render(request, "403.html", status=403)
    try:
        actions.do_start_round(round_obj)
        messages.success(request, f"Round {round_obj.pk} is starting.")
    except actions.Refused as exc:
        messages.error(request, exc.message)
    return redirect("mining-round", round_obj.pk)


def leaderboard(request):
    return render(request, "mining/leaderboard.html", {"scores": MinerScore.objects.select_related("user")})


# --- JSON API ------------------------------------------------------------------------------------


def _refused(exc):
    return ApiError(exc.status, exc.message, param=exc.param)


@api_view(["POST"])
@api_token_required
@rate_limited("mining", "R3MES_RATE_API")
def api_dataset_upload(request):
    """multipart: file, name, expert, format (jsonl|text|auto), description."""
    upload = request.FILES.get("file")
    if upload is None:
        raise ApiError(400, "Send the dataset as a multipart 'file' field", param="file")
    from django.conf import settings

    if upload.size > settings.MINING_MAX_DATASET_BYTES:
        raise ApiError(413, f"The file is {upload.size} bytes; the limit is {settings.MINING_MAX_DATASET_BYTES}",
                       param="file")
    form = DatasetUploadForm(request.POST, request.FILES)
    if not form.is_valid():
        errors = form.errors.get_json_data()
        param = next(iter(errors))
        message = "; ".join(e["message"] for e in errors[param])
        raise ApiError(422 if param == "__all__" else 400, message, param=None if param == "__all__" else param,
                       code="invalid_dataset" if param == "__all__" else None)
    data = form.cleaned_data
    dataset = actions.do_upload_dataset(request.user, name=data["name"], expert=data["expert"], fmt=data["fmt"],
                                        data=data["data"], description=data["description"])
    return JsonResponse(_dataset_json(dataset), status=201)


def _dataset_json(dataset):
    return {"id": dataset.pk, "name": dataset.name, "expert": dataset.expert, "format": dataset.format,
            "blob_cid": dataset.blob_cid, "sha256": dataset.sha256, "examples": dataset.examples,
            "size_bytes": dataset.size_bytes, "status": dataset.status}


def _submission_json(sub):
    return {"id": sub.pk, "round": sub.round_id, "shard": sub.shard, "miner": sub.miner_name,
            "blob_cid": sub.blob_cid, "sha256": sub.sha256, "examples": sub.examples, "eval_loss": sub.eval_loss,
            "status": sub.status, "reason": sub.reason}


@api_view(["GET"])
@api_token_required
@rate_limited("mining", "R3MES_RATE_API")
def api_round(request, pk):
    round_obj = Round.objects.filter(pk=pk).select_related("dataset").first()
    if round_obj is None:
        raise ApiError(404, f"No round with id {pk}")
    return JsonResponse({
        "id": round_obj.pk, "expert": round_obj.expert, "status": round_obj.status,
        "dataset": _dataset_json(round_obj.dataset), "shards": round_obj.shards, "rank": round_obj.rank,
        "alpha": round_obj.alpha, "lr": round_obj.lr, "steps": round_obj.steps, "batch_size": round_obj.batch_size,
        "seed": round_obj.seed, "target_modules": round_obj.target_modules, "method": round_obj.method,
        "eval_fraction": round_obj.eval_fraction, "base_cid": round_obj.base_cid,
        "merkle_root": round_obj.merkle_root, "result_adapter": round_obj.result_id,
        "submissions": [_submission_json(s) for s in round_obj.submissions.all()],
    })


@api_view(["POST"])
@api_token_required
@rate_limited("mining", "R3MES_RATE_API")
def api_submit(request, pk):
    """multipart: `file` (packed adapter: safetensors with the PEFT config in its metadata) and
    `metadata` (JSON: shard, sha256, examples, optional cid and train_losses)."""
    round_obj = Round.objects.filter(pk=pk).first()
    if round_obj is None:
        raise ApiError(404, f"No round with id {pk}")
    upload = request.FILES.get("file")
    if upload is None:
        raise ApiError(400, "Send the packed adapter as a multipart 'file' field", param="file")
    from django.conf import settings

    if upload.size > settings.MINING_MAX_SUBMISSION_BYTES:
        raise ApiError(413, f"The blob is {upload.size} bytes; the limit is {settings.MINING_MAX_SUBMISSION_BYTES}",
                       param="file")
    try:
        metadata = json.loads(request.POST.get("metadata") or "null")
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"'metadata' is not valid JSON: {exc}", param="metadata") from None
    if not isinstance(metadata, dict):
        raise ApiError(400, "'metadata' must be a JSON object with shard, sha256 and examples", param="metadata")
    try:
        submission = actions.do_submit(round_obj, request.user, upload.read(), metadata)
    except actions.Refused as exc:
        raise _refused(exc) from None
    return JsonResponse(_submission_json(submission), status=201)
