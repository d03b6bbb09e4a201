"""When the driver asks the calibration workers to save their states (pipeline.save_policy)."""

from __future__ import annotations

from aser.pipeline.save_policy import SavePolicy


def _walk(policy: SavePolicy, layers: int, forward_s: float, save_s: float) -> list[int]:
    """The boundaries saved over a run whose every layer's forward and save take the given
    seconds; each layer is recorded (observed) before the next boundary is decided."""
    saved = []
    for i in range(layers):
        boundary = i + 1
        if policy.due(boundary):
            saved.append(boundary)
            policy.observe({"forward": forward_s, "save_state": save_s})
        else:
            policy.observe({"forward": forward_s})
    return saved


def test_saves_when_the_forward_since_the_last_save_outweighs_a_save() -> None:
    # SmolLM2-135M here: ~0.7 s per save, ~7 s of forward per layer; share 0.02 -> a save per
    # 0.7 / 0.02 = 35 s of forward = every 5 layers (the first one measures the cost).
    assert _walk(SavePolicy(share=0.02), 30, 7.0, 0.7) == [1, 6, 11, 16, 21, 26]
    # Saves that cost nothing next to the forward: every boundary.
    assert _walk(SavePolicy(share=0.02), 4, 10.0, 0.1) == [1, 2, 3, 4]
    # The saves' share of the time stays within the budget (up to one layer's rounding).
    saved = _walk(SavePolicy(share=0.05), 200, 1.0, 0.5)
    assert 0.5 * len(saved) <= 0.05 * 200 + 0.5


def test_nothing_measured_yet_saves_and_a_fixed_interval_ignores_the_costs() -> None:
    p = SavePolicy()
    assert p.due(1) and p.due(2)  # layers not yet recorded: no costs known, so save
    assert _walk(SavePolicy(every=3), 10, 1.0, 100.0) == [3, 6, 9]
    assert _walk(SavePolicy(every=1), 3, 100.0, 100.0) == [1, 2, 3]
