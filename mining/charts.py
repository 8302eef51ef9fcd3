"""Server-side SVG line charts (no JS, no CDN): loss curves per miner and shard."""

import math

WIDTH, HEIGHT, PAD = 480, 180, 28
COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4d7c0f", "#be185d"]


def loss_chart(series):
    """{label: [loss per step]} -> dict for mining/_chart.html (polyline points in a fixed viewBox)."""
    clean = {k: [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
             for k, values in series.items()}
    clean = {k: v for k, v in clean.items() if v}
    if not clean:
        return None
    low = min(min(v) for v in clean.values())
    high = max(max(v) for v in clean.values())
    span = (high - low) or 1.0
    steps = max(len(v) for v in clean.values())
    lines = []
    for i, (label, values) in enumerate(clean.items()):
        points = []
        for step, value in enumerate(values):
            x = PAD + (WIDTH - 2 * PAD) * (step / max(steps - 1, 1))
            y = HEIGHT - PAD - (HEIGHT - 2 * PAD) * ((value - low) / span)
            points.append(f"{x:.1f},{y:.1f}")
        lines.append({"label": label, "points": " ".join(points), "colour": COLOURS[i % len(COLOURS)],
                      "last": values[-1]})
    return {"width": WIDTH, "height": HEIGHT, "pad": PAD, "lines": lines, "low": low, "high": high, "steps": steps,
            "bottom": HEIGHT - PAD, "right": WIDTH - PAD}
