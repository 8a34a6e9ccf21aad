"""``fraudstream demo``: the whole service on embedded defaults, its model and summary."""
