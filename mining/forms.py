from django import forms
from django.conf import settings

from .datasets import DatasetInvalid, guess_format, parse_dataset
from .models import Dataset, Round

TARGET_CHOICES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class DatasetUploadForm(forms.Form):
    name = forms.CharField(max_length=200)
    expert = forms.SlugField(max_length=40, help_text="The expert this data trains, e.g. <code>coding</code>")
    format = forms.ChoiceField(choices=[("auto", "Detect"), ("jsonl", "JSONL"), ("text", "Plain text")],
                               initial="auto", required=False)
    file = forms.FileField(help_text="JSONL lines <code>{\"instruction\", \"response\"}</code> or "
                                     "<code>{\"messages\": [...]}</code>, or plain text (paragraphs).")
    description = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), required=False, max_length=5000)

    def clean(self):
        cleaned = super().clean()
        upload = cleaned.get("file")
        if upload is None:
            return cleaned
        if upload.size > settings.MINING_MAX_DATASET_BYTES:
            raise forms.ValidationError(
                f"The file is {upload.size} bytes; the limit is {settings.MINING_MAX_DATASET_BYTES}")
        data = upload.read()
        fmt = cleaned.get("format") or "auto"
        if fmt == "auto":
            fmt = guess_format(upload.name, data)
        try:
            cleaned["examples"] = parse_dataset(data, fmt)
        except DatasetInvalid as exc:
            raise forms.ValidationError(exc.errors) from None
        cleaned["data"], cleaned["fmt"] = data, fmt
        return cleaned


class RoundForm(forms.ModelForm):
    targets = forms.MultipleChoiceField(choices=[(t, t) for t in TARGET_CHOICES], initial=TARGET_CHOICES,
                                        widget=forms.CheckboxSelectMultiple, label="Target modules")
    start_now = forms.BooleanField(required=False, initial=True, label="Start training now",
                                   help_text="Leave off to collect external submissions first")

    class Meta:
        model = Round
        fields = ["dataset", "shards", "rank", "alpha", "lr", "steps", "batch_size", "seed", "method",
                  "output_rank", "eval_fraction", "train_locally"]
        labels = {"lr": "Learning rate", "method": "Aggregation method"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["dataset"].queryset = Dataset.objects.filter(status=Dataset.Status.APPROVED)
        self.fields["dataset"].help_text = "Only datasets approved by governance can be mined"

    def clean(self):
        cleaned = super().clean()
        checks = {"shards": (1, 64), "rank": (1, 256), "steps": (1, 100_000), "batch_size": (1, 256),
                  "output_rank": (0, 4096)}
        for name, (low, high) in checks.items():
            value = cleaned.get(name)
            if value is not None and not low <= value <= high:
                self.add_error(name, f"Must be between {low} and {high}")
        for name in ("alpha", "lr"):
            value = cleaned.get(name)
            if value is not None and not (0 < value < 1e6):
                self.add_error(name, "Must be a positive number")
        fraction = cleaned.get("eval_fraction")
        if fraction is not None and not 0 < fraction < 0.9:
            self.add_error("eval_fraction", "Must be between 0 and 0.9")
        return cleaned

    def round_config(self):
        data = {k: self.cleaned_data[k] for k in self.Meta.fields if k != "dataset"}
        data["target_modules"] = list(self.cleaned_data["targets"])
        return data
