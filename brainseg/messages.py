"""Error messages that name what they found: a folder of 10,000 files or a volume of 240 label
values must still fit on one readable line."""


def first_few(items, limit=5):
    """The first `limit` items, comma-separated, with ", ..." when there are more."""
    items = list(items)
    shown = ", ".join(str(item) for item in items[:limit])
    return f"{shown}, ..." if len(items) > limit else shown
