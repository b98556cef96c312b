"""Placeholder: the compiled V4.1 step comes next."""


def supported(model, cache, ids) -> bool:
    return False
