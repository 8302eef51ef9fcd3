from decimal import Decimal

from django import template
from django.utils.safestring import mark_safe

from ..markdown import render_markdown

register = template.Library()


@register.filter
def markdown(text):
    return mark_safe(render_markdown(text))  # sanitised by nh3 in render_markdown


@register.filter
def percent(value, places=1):
    """A ratio (Decimal, str or None) as a percentage for display and bar widths."""
    if value in (None, ""):
        return "—"
    return f"{Decimal(value) * 100:.{int(places)}f}%"


@register.filter
def width(value):
    """A ratio as a CSS width in percent, clamped to 0..100."""
    if value in (None, ""):
        return "0%"
    number = min(max(Decimal(value) * 100, Decimal(0)), Decimal(100))
    return f"{number:.3f}%"


@register.filter
def duration(seconds):
    """Seconds as a short human duration: 172800 -> "2 days", 90 -> "1 min 30 s"."""
    seconds = int(seconds)
    parts = []
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count} {unit}{'s' if unit == 'day' and count > 1 else ''}")
    return " ".join(parts[:2]) or "0 s"
