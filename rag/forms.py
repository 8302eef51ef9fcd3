from django import forms
from django.contrib.auth import get_user_model

from .models import Collection


class CollectionForm(forms.ModelForm):
    """Creates a collection; also validates the JSON body of POST /api/rag/collections."""

    shared_with = forms.CharField(
        required=False, help_text="Usernames, separated by commas (for “shared with named users”)",
    )

    class Meta:
        model = Collection
        fields = ["name", "kind", "visibility", "news_ttl_days"]
        labels = {"news_ttl_days": "News TTL (days)"}

    def __init__(self, *args, owner, **kwargs):
        super().__init__(*args, **kwargs)
        self.owner = owner

    def clean_name(self):
        name = self.cleaned_data["name"].strip()
        if not name:
            raise forms.ValidationError("Give the collection a name")
        if Collection.objects.filter(owner=self.owner, name=name).exists():
            raise forms.ValidationError(f"You already have a collection named “{name}”")
        return name

    def clean_shared_with(self):
        raw = self.cleaned_data["shared_with"]
        names = raw if isinstance(raw, list) else [part.strip() for part in str(raw or "").split(",")]
        names = sorted({name for name in names if name})
        users = list(get_user_model().objects.filter(username__in=names))
        unknown = sorted(set(names) - {user.username for user in users})
        if unknown:
            raise forms.ValidationError(f"No such user: {', '.join(unknown)}")
        return [user for user in users if user.pk != self.owner.pk]

    def clean(self):
        cleaned = super().clean()
        if cleaned.get("visibility") == Collection.Visibility.SHARED and not cleaned.get("shared_with"):
            self.add_error("shared_with", "Name at least one other user to share the collection with")
        if cleaned.get("news_ttl_days") and cleaned.get("kind") != Collection.Kind.NEWS:
            self.add_error("news_ttl_days", "Only news collections expire their documents")
        return cleaned

    def save(self, commit=True):
        collection = super().save(commit=False)
        collection.owner = self.owner
        if commit:
            collection.save()
            if collection.visibility == Collection.Visibility.SHARED:
                collection.shared_with.set(self.cleaned_data["shared_with"])
        return collection
