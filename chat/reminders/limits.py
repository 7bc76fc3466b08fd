"""The ``[reminders]`` settings: how many reminders one user and one conversation may hold,
how often one may recur, and how delivery is paced."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ReminderSettings:
    """What reminders may cost.  Every bound is named in the refusal that it causes."""

    enabled: bool = True
    max_per_user: int = 25  # still to come, in every conversation together
    max_per_conversation: int = 100
    max_text_chars: int = 500
    min_interval_s: int = 60  # the shortest recurrence ("every 30 seconds" is refused)
    max_ahead_days: int = 3660  # about ten years
    # Delivered later than this after its time (the bot was down), a reminder says so.
    late_after_s: int = 60
    # How often the due reminders are looked for (delivery is on time within this, plus the
    # platform's own delay).
    poll_s: float = 1.0
    default_timezone: str = "UTC"

    def validate(self) -> None:
        """Raise ValueError naming the key of a value out of range."""
        for name in ("max_per_user", "max_per_conversation", "max_text_chars", "max_ahead_days"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.min_interval_s < 1:
            raise ValueError("min_interval_s must be at least 1")
        if self.late_after_s < 0:
            raise ValueError("late_after_s must not be negative")
        if not 0.05 <= self.poll_s <= 5:
            raise ValueError("poll_s must be from 0.05 to 5 (delivery is promised within 5 s)")
        from chat.reminders.when import zone_named

        if zone_named(self.default_timezone) is None:
            raise ValueError(f"default_timezone {self.default_timezone!r} is not a time zone")
