from decimal import Decimal

from django import forms
from django.contrib.auth.forms import UserCreationForm

from .models import OPTION_LABELS, VOTE_OPTIONS, ApiToken, Refused, User, parse_vote_options
from .targets import TARGETS
from .wallet import validate_wallet_address


class SignupForm(UserCreationForm):
    wallet_address = forms.CharField(
        required=False,
        max_length=44,
        help_text="Optional. remes1 followed by 38 lowercase letters or digits; one is generated if left empty.",
    )

    class Meta(UserCreationForm.Meta):
        model = User
        fields = ("username", "email", "wallet_address")

    def clean_wallet_address(self):
        address = self.cleaned_data.get("wallet_address", "").strip()
        if not address:
            return ""
        validate_wallet_address(address)
        if User.objects.filter(wallet_address=address).exists():
            raise forms.ValidationError("This wallet address belongs to another account.")
        return address

    def save(self, commit=True):
        user = super().save(commit=False)
        if not self.cleaned_data.get("wallet_address"):
            user.wallet_address = User._meta.get_field("wallet_address").get_default()
        if commit:
            user.save()
        return user


class ApiTokenForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="What the token is for, e.g. 'laptop CLI'.")

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        self.user = user

    def clean_name(self):
        name = self.cleaned_data["name"].strip()
        if not name:
            raise forms.ValidationError("Give the token a name.")
        if ApiToken.objects.filter(user=self.user, name=name, revoked_at__isnull=True).exists():
            raise forms.ValidationError("You already have an active token with this name.")
        return name


class ProposalForm(forms.Form):
    """Create form. `target` is "<kind>:<id>" from one select grouped by kind."""

    target = forms.ChoiceField(label="What to propose")
    title = forms.CharField(max_length=200)
    description = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 8}), required=False, max_length=20_000,
        help_text="Markdown. Why should the community trust this? Evaluation results, data sources, risks.",
    )
    expedited = forms.BooleanField(
        required=False,
        help_text="Shorter voting period, higher deposit and a 2/3 threshold; if it fails it becomes a regular vote.",
    )
    deposit = forms.DecimalField(
        required=False, min_value=0, decimal_places=6, max_digits=30,
        help_text="Initial deposit from your stake (voting opens once the minimum is reached).",
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        groups = []
        for kind, entry in TARGETS.items():
            options = [(f"{kind}:{obj.pk}", str(obj)) for obj in entry.candidates().order_by("-pk")[:200]]
            if options:
                groups.append((entry.label + "s", options))
        self.fields["target"].choices = [("", "Choose an adapter candidate, dataset or backbone version")] + groups

    def clean_target(self):
        kind, _, pk = self.cleaned_data["target"].partition(":")
        return kind, pk


class DepositForm(forms.Form):
    amount = forms.DecimalField(min_value=Decimal("0.000001"), decimal_places=6, max_digits=30)


class VoteForm(forms.Form):
    option = forms.ChoiceField(choices=list(OPTION_LABELS.items()), widget=forms.RadioSelect, required=False)
    weighted = forms.BooleanField(required=False, label="Split my vote")
    weight_yes = forms.DecimalField(required=False, min_value=0, max_value=1, label="Yes")
    weight_no = forms.DecimalField(required=False, min_value=0, max_value=1, label="No")
    weight_abstain = forms.DecimalField(required=False, min_value=0, max_value=1, label="Abstain")
    weight_no_with_veto = forms.DecimalField(required=False, min_value=0, max_value=1, label="No with veto")

    def clean(self):
        data = super().clean()
        if self.errors:
            return data
        split = {name: str(data[f"weight_{name}"]) for name in VOTE_OPTIONS if data.get(f"weight_{name}")}
        try:
            # Weights typed without ticking the box still mean a split vote, unless an option is chosen.
            if data.get("weighted") or (split and not data.get("option")):
                data["weights"] = parse_vote_options(weighted=split)
            else:
                if not data.get("option"):
                    raise forms.ValidationError("Choose an option.")
                data["weights"] = parse_vote_options(option=data["option"])
        except Refused as exc:
            raise forms.ValidationError(exc.message) from None
        return data
