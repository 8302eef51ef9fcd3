from django import forms
from django.contrib.auth.forms import UserCreationForm

from .models import ApiToken, User
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
