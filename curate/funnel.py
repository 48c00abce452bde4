"""Funnels: how many rows each rule dropped, in order, and what remained. Shared by every filtering stage."""

from __future__ import annotations


def funnel_steps(total: int, dropped: dict[str, int]) -> list[dict]:
    """[{rule, dropped, remaining}] in the order of `dropped`; the last `remaining` is what was kept."""
    from latentmill.errors import invariant

    steps, remaining = [], total
    for rule, count in dropped.items():
        invariant(count >= 0, f"rule {rule} dropped {count} rows")
        remaining -= count
        steps.append({"rule": rule, "dropped": count, "remaining": remaining})
    return steps


def format_funnel(label: str, total: int, steps: list[dict], kept: int) -> str:
    """The funnel as an aligned text table."""
    width = max([len(label), 4, *(len(s["rule"][:40]) + 4 for s in steps)])
    lines = [f"{label:<{width}}{total:>12,}"]
    for step in steps:
        lines.append(
            f"  - {step['rule'][:40]:<{width - 4}}{step['dropped']:>12,} dropped, {step['remaining']:,} left"
        )
    lines.append(f"{'kept':<{width}}{kept:>12,}")
    return "\n".join(lines)
