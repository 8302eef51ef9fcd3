from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.http import JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from r3mes_site.api import api_token_required, api_view

from .forms import ApiTokenForm, SignupForm
from .models import ApiToken


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
