"""Shared by the loader tests: every bad input is ONE QkvxError line naming what is wrong."""

import pytest

import qkvx


@pytest.fixture
def load_error():
    """load_error(path, *needles) -> message; asserts one line that contains every needle."""

    def check(path, *needles):
        with pytest.raises(qkvx.QkvxError) as info:
            qkvx.load(path)
        msg = str(info.value)
        assert "\n" not in msg, msg
        for needle in needles:
            assert str(needle) in msg, f"{needle!r} not in {msg!r}"
        return msg

    return check
