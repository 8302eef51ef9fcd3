from django.urls import NoReverseMatch, reverse

# (label, url name). An entry shows once its app serves the page, so the menu never links to a 404.
NAVIGATION = [
    ("Playground", "playground"),
    ("Documents", "documents"),
    ("Governance", "governance"),
    ("Mining", "mining"),
]


def navigation(request):
    items = []
    for label, name in NAVIGATION:
        try:
            url = reverse(name)
        except NoReverseMatch:
            continue
        items.append({"label": label, "url": url, "active": request.path.startswith(url) and url != "/"})
    return {"nav_items": items}
