"""Fixtures of the training tests."""

import pytest


@pytest.fixture
def interrupt_after_first_epoch(monkeypatch):
    """Make the next training loop (SFT or DPO: both save their state through
    ``loop._save_resume``) stop with a ``KeyboardInterrupt`` right after its first epoch's
    resume state is written, as a killed process would; later saves run normally."""
    import poisonmech.train.loop as loop

    real, calls = loop._save_resume, []

    def crash_after_first_epoch(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(loop, "_save_resume", crash_after_first_epoch)
    return calls
